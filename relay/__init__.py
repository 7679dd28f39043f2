"""relay: a fast, faithful HTTP relay that puts the OpenAI APIs behind one fixed configuration."""

"""Memory: passes that lower the activation memory a model needs (reorder-for-memory), built on
the analysis in infoptc.memory."""

"""Layout: passes that move or change the data layout of tensors (convert-layout)."""

"""Model structure: repeated blocks, quantizable tensors, and which layers feed which."""

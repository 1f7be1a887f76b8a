"""Model loading: a name or a local folder in, a circuitlib Transformer and its tokenizer out."""

"""The distillation loss: KL, MLM, cosine and MSE terms, MiniLM relations, attention scores, sentence-level terms,
and the fused LM head that computes only the positions a term needs."""

"""The speed machinery: batched KV-cached decoding and fused log-probs, each beside its plain reference."""

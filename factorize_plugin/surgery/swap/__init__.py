"""The swap: the one refactorization transaction, optimizer edits, checkpoint structure (also FSDP2 and
Hugging Face)."""

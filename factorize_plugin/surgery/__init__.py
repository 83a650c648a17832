"""Model-level surgery (plain PyTorch, no Lightning): which layers (targets), which ranks
(policies, output-judged budgets), the one refactorization transaction, one-shot
``factorize_model``, statistics collection and checkpoint structure."""

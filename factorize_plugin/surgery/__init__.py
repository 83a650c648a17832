"""Model-level surgery (plain PyTorch, no Lightning), one sub-package per stage of the pipeline a
milestone or a one-shot call runs: ``select`` (which layers), ``statistics`` (their inputs' moments),
``ranks`` (which ranks), ``timing`` (whether it gets faster), ``swap`` (the one refactorization
transaction, optimizer edits, checkpoint structure) and ``report``. At the top: the path both entry
points share (``pipeline.py``), one-shot ``factorize_model`` (``oneshot.py``), how a batch becomes
the model's input (``calling.py``), the settings' checks, progressive schedules and the transformer
fast-path switch."""

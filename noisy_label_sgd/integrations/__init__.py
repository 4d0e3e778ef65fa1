"""Trainer integrations, each importing its library only when imported itself:
:mod:`~noisy_label_sgd.integrations.lightning` (PyTorch Lightning) and
:mod:`~noisy_label_sgd.integrations.huggingface` (the Hugging Face Trainer)."""

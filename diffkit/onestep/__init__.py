"""One-step and few-step generators: shortcut models, reflow, score identity distillation."""

"""The training steps `finetune.py` calls: arguments, trainability plan, Trainer, checkpoints, evaluation, loss plot."""

"""The training plane: the multimodal model, DeepSpeed ZeRO under Ray Train, evaluation, export."""

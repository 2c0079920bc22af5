"""Few-shot evaluation harness (model-independent half): metrics, task data and prompts, demo selection,
reports. The model-running loop lives elsewhere and calls into these modules."""

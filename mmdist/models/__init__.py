"""Model core: backbones (LLM, vision, text), connectors, the stage-1 align model and the stage-2 fused VLM. No DeepSpeed here."""

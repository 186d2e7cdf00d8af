"""mmdist: turn a frozen text LLM and a frozen vision encoder into a vision-language model, at cluster scale."""

__version__ = "0.1.0"

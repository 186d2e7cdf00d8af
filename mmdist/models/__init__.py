"""Model core: backbones (LLM, vision, text), connectors, the
stage-1 align model and the stage-2 fused VLM. No DeepSpeed here.

Import the module you need (``from mmdist.models.build import build_model``): this
package imports nothing, so that reading a config (which imports the settings
classes in this package) does not load transformers.
"""

"""lmkit: a folder of text in, a trained, evaluated and published GPT-2-class language model out."""

from transformers import AutoConfig, AutoModelForCausalLM

from lmkit.configuration import LmkitConfig
from lmkit.hub import load_model, load_tokenizer
from lmkit.modeling import LmkitForCausalLM

__version__ = "0.1.0"

# `import lmkit` is enough for AutoConfig / AutoModelForCausalLM to read a run directory whose config.json says
# model_type "lmkit"; no trust_remote_code is involved.
AutoConfig.register("lmkit", LmkitConfig)
AutoModelForCausalLM.register(LmkitConfig, LmkitForCausalLM)

__all__ = ["LmkitConfig", "LmkitForCausalLM", "__version__", "load_model", "load_tokenizer"]

"""Tiny random-weight builds of every model family, made offline in about a second each.

Same block structure as the real models (where the attention layers sit, how the text is
tokenized and encoded), random weights: the tests, benchmarks and quick notebook demos run
every code path that touches attention on a CPU.

* :mod:`.unet` - SD 1.5, SD 2.1, SDXL;  * :mod:`.mmdit` - Flux.1, SD3;  * :mod:`.dit` - PixArt-Σ, Sana;
* :mod:`.joint` - Chroma, Qwen-Image, Z-Image, Flux.2 Klein;  * :mod:`.vision` - the real-image evaluation's models.
"""
from .dit import tiny_gemma_tokenizer, tiny_pixart_pipeline, tiny_sana_pipeline
from .joint import (tiny_chroma_pipeline, tiny_flux2_klein_pipeline, tiny_qwen_tokenizer, tiny_qwenimage_pipeline,
                    tiny_zimage_pipeline)
from .mmdit import TINY_MMDIT_DEFAULTS, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_t5_tokenizer
from .unet import (SD15_ATTENTION_GRIDS, SD21_ATTENTION_GRIDS, SDXL_ATTENTION_GRIDS,
                   SDXL_LAYERS_PER_GRID, TINY_WORDS, tiny_sd15_pipeline, tiny_sd21_pipeline, tiny_sdxl_pipeline,
                   tiny_tokenizer)
from .vision import tiny_vision_folders

__all__ = ["SD15_ATTENTION_GRIDS", "SD21_ATTENTION_GRIDS", "SDXL_ATTENTION_GRIDS",
           "SDXL_LAYERS_PER_GRID", "TINY_MMDIT_DEFAULTS", "TINY_WORDS", "tiny_chroma_pipeline",
           "tiny_flux2_klein_pipeline", "tiny_flux_pipeline", "tiny_gemma_tokenizer", "tiny_pixart_pipeline",
           "tiny_qwen_tokenizer", "tiny_qwenimage_pipeline", "tiny_sana_pipeline", "tiny_sd15_pipeline",
           "tiny_sd21_pipeline", "tiny_sd3_pipeline", "tiny_sdxl_pipeline", "tiny_t5_tokenizer", "tiny_tokenizer",
           "tiny_vision_folders", "tiny_zimage_pipeline"]

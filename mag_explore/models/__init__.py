"""Models: which ones are accepted (checked from their small config files before any weight
is read), loading them, and their generation defaults.

* :mod:`.files` - finding a model (hub id, local folder, embedded name) and checking it;
* :mod:`.load` - :func:`load_pipeline`, :func:`model_defaults`, devices, dtypes and CPU threads.
"""
from .files import (DEFAULT_GPU_MODEL, EMBEDDED, SHAPES, SHAPES_FLUX, SUPPORTED, UnsupportedModelError, check_supported,
                    embedded_model_dir, locate, require_safetensors, shapes_model_dir, supported_models)
from .load import (DEFAULTS_FILE, MODEL_ENV, SMALL_MODEL_PARAMETERS, THREADS_ENV, default_device, default_dtype,
                   library_output, load_pipeline, model_defaults, resolve_model_name, use_cpu_threads)

__all__ = ["DEFAULTS_FILE", "DEFAULT_GPU_MODEL", "EMBEDDED", "MODEL_ENV", "SHAPES", "SHAPES_FLUX", "SMALL_MODEL_PARAMETERS",
           "SUPPORTED", "THREADS_ENV", "UnsupportedModelError", "check_supported", "default_device", "default_dtype",
           "embedded_model_dir", "library_output", "load_pipeline", "locate", "model_defaults", "require_safetensors",
           "resolve_model_name", "shapes_model_dir", "supported_models", "use_cpu_threads"]

"""Real images: DDIM inversion (:mod:`.inversion`) and editing an image's layout (:mod:`.edit`)."""
from .edit import STARTS, EditResult, edit_image, layout_from_attention, move_latents, renoise
from .inversion import InversionResult, as_pil_image, encode_image, inversion_step, invert, psnr, reconstruct

__all__ = ["STARTS", "EditResult", "InversionResult", "as_pil_image", "edit_image", "encode_image", "inversion_step",
           "invert", "layout_from_attention", "move_latents", "psnr", "reconstruct", "renoise"]

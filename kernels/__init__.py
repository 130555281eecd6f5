"""chopgrad.kernels (work in progress)."""
from .pixel_losses import pixel_loss_value_and_grad

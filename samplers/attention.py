"""The attention processors live in :mod:`components.attention` (editing and the samplers
both build on them); ``samplers.attention`` is that very module, kept for its importers."""

import sys

from components import attention as _attention

sys.modules[__name__] = _attention

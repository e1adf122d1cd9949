"""Eagle3: one fused-feature decoder layer trained with training-time test (DESIGN section 4)."""

from dspark.drafters.eagle3.model import Eagle3Drafter
from dspark.drafters.eagle3.vocab import (
    build_draft_vocab,
    count_supervised_tokens,
    draft_to_target_ids,
)

__all__ = ["Eagle3Drafter", "build_draft_vocab", "count_supervised_tokens", "draft_to_target_ids"]

import pytest
import torch

from dspark.config import TargetConfig
from dspark.targets import load_target


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_features_match_hidden_states_and_decode_matches_full_forward(family, request):
    path = request.getfixturevalue(f"tiny_{family}_dir")
    target = load_target(TargetConfig(name_or_path=str(path), layer_ids=[-1, 0, 2, 3]))  # 3: the last layer
    ids = torch.randint(0, 1000, (2, 12))
    last = {}
    hook = target.model.model.layers[-1].register_forward_hook(lambda module, args, out: last.update(out_BTH=out))
    feats = target.features(ids)
    hook.remove()
    out = target.model(ids, output_hidden_states=True)
    assert feats.layers_BTLH.shape == (2, 12, 4, 64)
    torch.testing.assert_close(feats.layers_BTLH[:, :, 0], out.hidden_states[0])
    torch.testing.assert_close(feats.layers_BTLH[:, :, 2], out.hidden_states[3])
    # The last id is the last decoder layer's own output, before the final norm (transformers' hidden_states[-1] is
    # the normed final state instead).
    assert torch.equal(feats.layers_BTLH[:, :, 3], last["out_BTH"])
    torch.testing.assert_close(target.model.model.norm(feats.layers_BTLH[:, :, 3]), feats.final_BTH)
    torch.testing.assert_close(target.model.lm_head(feats.final_BTH), out.logits)

    # Incremental decoding (with a rollback) equals the full forward.
    session = target.decode_session()
    logits_a, f_a = session.extend(ids[0, :5])
    session.extend(ids[0, 5:9] + 1)  # wrong continuation, then rolled back
    session.truncate(5)
    logits_b, f_b = session.extend(ids[0, 5:])
    torch.testing.assert_close(torch.cat([logits_a, logits_b]), out.logits[0].float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([f_a, f_b]), feats.layers_BTLH[0], atol=1e-5, rtol=1e-4)


def test_bad_layer_ids_and_missing_path(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 4]))
    with pytest.raises(ValueError, match="does not exist"):
        load_target(TargetConfig(name_or_path=str(tmp_path / "nope.gguf"), layer_ids=[0]))
    with pytest.raises(ValueError, match="no config.json"):
        load_target(TargetConfig(name_or_path=str(tmp_path), layer_ids=[0]))

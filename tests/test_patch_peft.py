"""patch_model on a PEFT LoRA model: same outputs as the unpatched PEFT model, and the attention loss alone
trains exactly the LoRA parameters."""
import torch
from peft import LoraConfig, get_peft_model

from causal_attn import patch_model
from causal_attn.testing.numerics import fresh_seed
from causal_attn.testing.models import forward_backward, random_batch, random_graph, tiny_model


def lora(model):
    # init_lora_weights=False: B is random too, so both A and B get a gradient at the first step
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


def test_lora_gets_gradients_from_attention_loss_alone():
    seed = fresh_seed()
    model = lora(tiny_model("qwen2", seed=seed % 1000, train=True))
    ids, mask, _ = random_batch(97, 2, 18, padding="left", seed=seed)
    handle = patch_model(model, alpha=1.5)
    model(input_ids=ids, attention_mask=mask, adjacency=random_graph(mask, seed=seed))
    loss = handle.loss()
    assert loss.item() > 0
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in model.named_parameters():
        if n in trainable:
            # the last layer's LoRA on v only changes outputs after the last attention: no mass gradient there
            if "layers.1.self_attn.v_proj" not in n:
                assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n


def test_patched_peft_matches_unpatched_peft_and_unpatch():
    seed = fresh_seed()
    ref = lora(tiny_model("llama", seed=seed % 1000, kv_heads=2))
    ours = lora(tiny_model("llama", seed=seed % 1000, kv_heads=2))
    ours.load_state_dict(ref.state_dict())
    ids, mask, labels = random_batch(97, 3, 16, padding="right", seed=seed)
    expected = forward_backward(ref, ids, mask, labels)
    handle = patch_model(ours)
    assert ours.get_base_model().config._attn_implementation == "causal_attn"
    got = forward_backward(ours, ids, mask, labels, adjacency=random_graph(mask, seed=seed))
    real = mask.bool()
    torch.testing.assert_close(got[0][real], expected[0][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
    assert got[2].keys() == expected[2].keys()
    for n in expected[2]:
        torch.testing.assert_close(got[2][n], expected[2][n], rtol=1e-4, atol=1e-6, msg=n)
    handle.unpatch()
    assert ours.get_base_model().config._attn_implementation == "eager"

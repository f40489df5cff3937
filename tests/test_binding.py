"""Binding supervision (memory3.train.binding): the attention share on the right memory on a
hand-built case, the same share from what the attention op really receives, and the trainer
option that adds it to the loss."""
import math

import pytest
import torch

from memory3.model import Memory3Config, Memory3Model
from memory3.model.tokenizer import train_bpe
from memory3.train import binding
from memory3.train.config import TrainConfig
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase
from memory3.train.tasks import IGNORE, SyntheticRecipe, SyntheticTask
from memory3.train.trainer import LossModel, Trainer

KB = SyntheticKnowledgeBase(SyntheticConfig(n_train=60, n_heldout=10, n_names=100, seed=2))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(list(KB.training_documents()) + [r["text"] for r in KB.references()], 600)


def test_share_of_a_hand_built_case():
    """2 query heads per KV head, 2 KV heads, 3 memories of 2 keys, D = 2, scale 1: every
    logit is a dot product written down here, so the share is known in closed form."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])  # [K=1, Hq=4, D=2]
    k = torch.zeros(1, 3, 2, 2, 2)  # [K, R=3, Hkv=2, M=2, D]
    k[0, 1, 0, 0] = torch.tensor([math.log(3.0), 0.0])  # KV head 0, memory 1, key 0
    k[0, 2, 0, 1] = torch.tensor([0.0, math.log(5.0)])  # KV head 0, memory 2, key 1
    k[0, 1, 1, 1] = torch.tensor([1.0, 0.0])            # KV head 1, memory 1, key 1
    share = binding.right_log_share(q, k, torch.tensor([1]), scale=1.0).exp()[0]
    # head 0 (KV 0, q = e0): exps over (mem0: 1, 1), (mem1: 3, 1), (mem2: 1, 1) -> 4 / 8
    # head 1 (KV 0, q = e1): (1, 1), (1, 1), (1, 5) -> 2 / 10
    # head 2 (KV 1, q = 2 e0): (1, 1), (1, e^2), (1, 1) -> (1 + e^2) / (5 + e^2)
    # head 3 (KV 1, q = 0): uniform -> 1 / 3
    e2 = math.exp(2.0)
    torch.testing.assert_close(share, torch.tensor([0.5, 0.2, (1 + e2) / (5 + e2), 1 / 3]))
    # an empty slot leaves the softmax: head 3 then splits 1/2 between memories 0 and 1
    valid = torch.tensor([[True, True, False]])
    assert binding.right_log_share(q, k, torch.tensor([1]), valid, scale=1.0).exp()[0, 3].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="right must be"):
        binding.right_log_share(q, k, torch.tensor([3]))


@pytest.mark.parametrize("positions", ["parallel", "ranked"])
def test_share_matches_what_the_attention_op_reads(tokenizer, positions, monkeypatch):
    """answer_log_shares rebuilds the memory layers' post-RoPE queries from wq and the memory
    keys from the encoder's output; the op itself receives q and mem_k: the share computed
    from those at the answer positions must be the same."""
    import memory3.model.transformer as transformer

    torch.manual_seed(0)
    config = Memory3Config.preset("tiny", vocab_size=tokenizer.vocab_size, memory_positions=positions)
    model = Memory3Model(config)
    task = SyntheticTask(KB, tokenizer, config, recipe=SyntheticRecipe(rag_share=0.0, curriculum_frac=0.0),
                         total_steps=10, micro_batch=3, seed=1)
    b = task.batch(2, 0)
    assert b.right is not None and b.right.shape == (3,) and b.mem_ids.shape[2] == 5
    seen = []
    real = transformer.ops.memory_attention

    def spy(q, k, v, mem_k, mem_v, mem_ids, *args, **kwargs):
        seen.append((q.detach(), mem_k.detach(), mem_ids))
        return real(q, k, v, mem_k, mem_v, mem_ids, *args, **kwargs)

    from memory3.memory.encoder import encode_references
    from memory3.model import Memories
    memory = encode_references(model, b.refs, b.ref_lens)
    layers = tuple(config.memory_layers)
    monkeypatch.setattr(transformer.ops, "memory_attention", spy)
    with torch.no_grad(), binding.capture_queries(model, layers) as queries:
        model(b.tokens, Memories.from_stacked(memory, b.mem_ids))
    where = b.targets != IGNORE
    got = binding.answer_log_shares(model, queries, where, memory.detach(), b.mem_ids, b.right, layers)
    bi, ti = where.nonzero(as_tuple=True)
    chunk = (ti - config.prefix_len) // config.chunk_size
    for n, layer in enumerate(layers):
        q, mem_k, ids = seen[layer]  # memory layers are called first, in order
        keys = mem_k[ids[bi, chunk].long()]  # [K, R, Hkv, M, D] as the op reads them (ranked: rotated per slot)
        # the op's right slot is the task's, whatever the layout did to the rows
        want = binding.right_log_share(q[bi, ti], keys, b.right[bi])
        torch.testing.assert_close(got[:, n], want, atol=1e-5, rtol=1e-5)
    assert got.shape == (int(where.sum()), len(layers), config.n_heads)


def test_trainer_adds_the_supervision(tokenizer, tmp_path):
    """bind_supervision > 0: memory steps log the right memory's share and the supervision's
    loss, the objective's gradient changes, and it stops after bind_until; bad layers are
    refused by name."""
    config = Memory3Config.preset("tiny", vocab_size=tokenizer.vocab_size)

    def trainer(out, **kw):
        torch.manual_seed(0)
        tc = TrainConfig.recipe_defaults("single-stage", steps=4, batch_size=4, rag_share=0.0, curriculum_frac=0.0,
                                         warmup_frac=0.0, **kw)
        recipe = SyntheticRecipe.from_config(tc)
        return Trainer(Memory3Model(config), lambda r, w, m: SyntheticTask(
            KB, tokenizer, config, recipe=recipe, total_steps=4, micro_batch=m, rank=r, world_size=w),
            tc, out, progress=False)

    plain, sup = trainer(tmp_path / "a"), trainer(tmp_path / "b", bind_supervision=5.0, bind_until=0.5)
    plain.fit()
    sup.fit()
    assert plain.history[0]["loss"] == sup.history[0]["loss"]  # the logged loss is the answer loss alone
    assert "right_share" not in plain.history[0]
    for h in sup.history:
        assert 0 < h["right_share"] < 1
        assert h["bind_loss"] >= -math.log(h["right_share"]) - 1e-6  # Jensen: mean -log >= -log mean
    assert [h["bind_weight"] for h in sup.history] == [5.0, 5.0, 0.0, 0.0]
    assert plain.history[1]["loss"] != sup.history[1]["loss"]  # step 0's update differed
    with pytest.raises(ValueError, match="bind_layers"):
        trainer(tmp_path / "c", bind_supervision=1.0, bind_layers=(3,))
    with pytest.raises(ValueError, match="bind_supervision"):
        TrainConfig(bind_supervision=-1.0)


def test_loss_model_objective_is_answer_loss_plus_weighted_supervision(tokenizer):
    torch.manual_seed(0)
    config = Memory3Config.preset("tiny", vocab_size=tokenizer.vocab_size)
    model = Memory3Model(config)
    b = SyntheticTask(KB, tokenizer, config, recipe=SyntheticRecipe(rag_share=0.0, curriculum_frac=0.0),
                      total_steps=10, micro_batch=2).batch(1, 0)
    lm = LossModel(model, (1,))
    obj = lm(b.tokens, b.targets, b.refs, b.ref_lens, b.mem_ids, b.right, 2.0)
    assert obj.item() == pytest.approx(lm.stats["ce"].item() + 2.0 * lm.stats["bind"].item(), rel=1e-6)
    assert lm.stats["positions"] == int((b.targets != IGNORE).sum())
    # without the right slot there is nothing to supervise: the plain answer loss
    assert lm(b.tokens, b.targets, b.refs, b.ref_lens, b.mem_ids).item() == pytest.approx(lm.stats["ce"].item())

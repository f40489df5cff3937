"""The trainer: exact resume, schedules, checkpoint format (no pickle), the leakage filter
of the continual stage and the single-stage recipe's batches."""
import json

import pytest
import torch

from memory3.model import Memory3Config, Memory3Model
from memory3.model.tokenizer import train_bpe
from memory3.retrieval.overlap import overlap
from memory3.train.config import TrainConfig
from memory3.train.data import write_token_shards
from memory3.train.schedule import lr_at
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase
from memory3.train.tasks import IGNORE, ContinualTask, SyntheticRecipe, SyntheticTask, WarmupTask
from memory3.train.trainer import Trainer

KB = SyntheticKnowledgeBase(SyntheticConfig(n_train=120, n_heldout=20, n_names=200, seed=1))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def tokenizer():
    texts = list(KB.training_documents()) + [r["text"] for r in KB.references()]
    return train_bpe(texts, 700)


@pytest.fixture(scope="module")
def shards(tokenizer, tmp_path_factory):
    return write_token_shards(KB.training_documents(), tokenizer, tmp_path_factory.mktemp("shards"),
                              eos_id=2, progress=False)


def tiny(tokenizer, **kw):
    return Memory3Config.preset("tiny", vocab_size=tokenizer.vocab_size, **kw)


def warmup_trainer(shards, config, out, steps=6, **kw):
    torch.manual_seed(0)
    model = Memory3Model(config)
    tc = TrainConfig.recipe_defaults("warmup", steps=steps, batch_size=4, micro_batch=2, seq_len=48,
                                     warmup_frac=0.34, **kw)
    return Trainer(model, lambda r, w, m: WarmupTask(shards, config, seq_len=48, micro_batch=m, rank=r,
                                                       world_size=w), tc, out, progress=False)


def single_stage_trainer(tokenizer, config, out, steps=6):
    torch.manual_seed(0)
    tc = TrainConfig.recipe_defaults("single-stage", steps=steps, batch_size=4, micro_batch=2, warmup_frac=0.34,
                                     rag_share=0.34)
    recipe = SyntheticRecipe(rag_share=0.34)
    return Trainer(Memory3Model(config), lambda r, w, m: SyntheticTask(
        KB, tokenizer, config, recipe=recipe, total_steps=steps, micro_batch=m, rank=r, world_size=w),
        tc, out, progress=False)


@pytest.mark.parametrize("recipe", ["warmup", "single-stage"])
def test_resume_gives_the_same_losses(shards, tokenizer, tmp_path, recipe):
    config = tiny(tokenizer, ref_len=64)
    make = (lambda out: warmup_trainer(shards, config, out)) if recipe == "warmup" else \
        (lambda out: single_stage_trainer(tokenizer, config, out))
    straight = make(tmp_path / "a")
    straight.fit()
    first = make(tmp_path / "b")
    first.fit(stop_at=3)
    assert (tmp_path / "b" / "step_000003").is_dir()
    resumed = make(tmp_path / "b")   # a new process would do this
    assert resumed.step == 3
    resumed.fit()
    losses = lambda t: [h["loss"] for h in t.history]  # noqa: E731
    assert losses(resumed) == losses(straight)
    assert recipe == "warmup" or any(h["memory"] for h in straight.history[3:])
    for name, p in straight.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    fresh = make(tmp_path / "c")
    fresh.fit(stop_at=3)
    assert losses(fresh)[:3] == losses(straight)[:3] and losses(straight)[-1] < losses(straight)[0]


def test_checkpoint_is_safetensors_and_json(shards, tokenizer, tmp_path):
    t = warmup_trainer(shards, tiny(tokenizer), tmp_path, steps=4, checkpoint_every=1, keep_checkpoints=2)
    t.fit()
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == ["step_000003", "step_000004"]
    files = sorted(p.name for p in (tmp_path / "step_000004").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((tmp_path / "step_000004" / "state.json").read_text())
    assert state["step"] == 4 and state["train_config"]["recipe"] == "warmup" and len(state["history"]) == 4
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    (tmp_path / "step_000004" / "state.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        warmup_trainer(shards, tiny(tokenizer), tmp_path, steps=4)


def test_schedules():
    wsd = [lr_at(s, peak=1.0, total=100, warmup=10, kind="wsd", decay_frac=0.2) for s in range(100)]
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == 1.0 and wsd[50] == 1.0 and wsd[79] == 1.0
    assert wsd[80] < 1.0 and wsd[99] == pytest.approx(0.0) and all(a >= b for a, b in zip(wsd[10:], wsd[11:]))
    cos = [lr_at(s, peak=1.0, total=100, warmup=10, kind="cosine", min_ratio=0.1) for s in range(100)]
    assert cos[10] == 1.0 and cos[55] == pytest.approx(0.55, abs=0.02) and cos[99] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, peak=1, total=10, warmup=1, kind="linear")


class LeakyRetriever:
    """Retrieves, for every chunk, first a reference that copies the training text itself
    (must be dropped by the 0.9 filter), then an unrelated reference."""

    def __init__(self, task_refs):
        self.task_refs = task_refs
        self.queries = []

    def __call__(self, texts, k):
        self.queries += texts
        return [[0, 1 + i % 3] for i, _ in enumerate(texts)]


def test_continual_task_leakage_filter_and_chunk_window(shards, tokenizer):
    config = tiny(tokenizer, chunk_size=16)
    probe = WarmupTask(shards, config, seq_len=80, micro_batch=2, seed=5)
    tokens, _ = probe.lm_rows(step=0, micro=0)
    leaking = tokens[0, 10:60].tolist()                       # a copy of part of sequence 0
    unrelated = [tokenizer.encode(KB.reference_text(p)) for p in KB.heldout_people[:3]]
    retriever = LeakyRetriever(None)
    task = ContinualTask(shards, config, references=[leaking, *unrelated], retriever=retriever,
                         detokenize=tokenizer.decode, seq_len=80, micro_batch=2, seed=5)
    assert overlap(tokens[0, 1:].tolist(), leaking) > 0.9
    b = task.batch(step=0, micro=0)
    assert torch.equal(b.tokens, tokens)
    C = -(-(tokens.shape[1] - config.prefix_len) // config.chunk_size)
    assert b.mem_ids.shape == (2, C, 5) and len(retriever.queries) == 2 * C
    rows = [b.refs[i, :int(b.ref_lens[i])].tolist() for i in range(len(b.refs))]
    leak_rows = [i for i, r in enumerate(rows) if r[-len(leaking):] == leaking]
    assert len(leak_rows) == 1                                  # sequence 1 may read it: no overlap there
    assert leak_rows[0] not in b.mem_ids[0].tolist()            # sequence 0 never reads its own copy
    assert leak_rows[0] in b.mem_ids[1].flatten().tolist()
    assert task.skipped_leaks == C                              # sequence 0: every chunk's first hit dropped
    for c in range(C):                                          # chunk c reads chunks c-4..c: min(c+1, 5) refs
        assert int((b.mem_ids[0, c] >= 0).sum()) == min(c + 1, 5)
    # without the filter the copy is used
    open_task = ContinualTask(shards, config, references=[leaking, *unrelated], retriever=LeakyRetriever(None),
                              detokenize=tokenizer.decode, seq_len=80, micro_batch=2, seed=5, leak_threshold=1.0)
    ob = open_task.batch(step=0, micro=0)
    rows = [ob.refs[i, :int(ob.ref_lens[i])].tolist() for i in range(len(ob.refs))]
    leak_row = next(i for i, r in enumerate(rows) if r[-len(leaking):] == leaking)
    assert leak_row in ob.mem_ids[0].flatten().tolist() and open_task.skipped_leaks == 0


def test_single_stage_batches(tokenizer):
    config = tiny(tokenizer)
    recipe = SyntheticRecipe(rag_share=0.3)
    task = SyntheticTask(KB, tokenizer, config, recipe=recipe, total_steps=100, micro_batch=3, seed=2)
    assert [recipe.memories_at(s, 100) for s in (0, 8, 15, 30, 99)] == [1, 2, 3, 5, 5]
    kinds = {recipe.is_rag_step(2, s) for s in range(40)}
    assert kinds == {True, False}
    for step in range(12):
        b = task.batch(step, 0)
        rag = recipe.is_rag_step(2, step)
        assert (b.refs is None) == rag
        for row, tgt in zip(b.tokens, b.targets):
            spans, run = [], []
            for t in tgt.tolist() + [IGNORE]:
                if t != IGNORE:
                    run.append(t)
                elif run:
                    spans, run = spans + [run], []
            answers = [tokenizer.decode(span).strip() for span in spans]
            at = (tgt != IGNORE).nonzero().flatten()
            assert torch.equal(tgt[at], row[at + 1])                 # targets[i] is the token after i
            assert len(answers) == 5 and all(" " not in a for a in answers)   # answers only
            text = tokenizer.decode(row.tolist())
            for a in answers:
                assert f"A: {a} ." in text
            assert row[0] == config.prefix_ids[0] and row[1] == config.bos_id
        if not rag:
            n = recipe.memories_at(step, 100)
            assert b.mem_ids.shape[0] == 3 and b.mem_ids.shape[2] == n and len(b.refs) == 3 * n
            for i in range(3):                               # the asked person's bio is one of the memories
                name, = set(tokenizer.decode(b.tokens[i].tolist()).split("?")[0].split()) & set(KB.first_names)
                bios = [tokenizer.decode(b.refs[j].tolist()) for j in b.mem_ids[i, 0].tolist()]
                assert sum(name in bio for bio in bios) == 1
    assert torch.equal(task.batch(7, 1).tokens, task.batch(7, 1).tokens)
    two = [SyntheticTask(KB, tokenizer, config, recipe=recipe, total_steps=100, micro_batch=3, seed=2,
                         rank=r, world_size=2).batch(20, 0).tokens for r in range(2)]
    one = SyntheticTask(KB, tokenizer, config, recipe=recipe, total_steps=100, micro_batch=6, seed=2).batch(20, 0)
    strip = lambda row: [t for t in row.tolist() if t != config.pad_id]  # noqa: E731
    assert [strip(r) for t in two for r in t] == [strip(r) for r in one.tokens]   # ranks split one batch


def test_bf16_autocast_step(tokenizer, tmp_path):
    """The GPU path (bf16 autocast) on the CPU: a memory step trains and its loss is close
    to the float32 one."""
    config = tiny(tokenizer, ref_len=64)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        recipe = SyntheticRecipe(rag_share=0.0)
        tc = TrainConfig.recipe_defaults("single-stage", steps=2, batch_size=2, precision=precision, rag_share=0.0)
        t = Trainer(Memory3Model(config), lambda r, w, m: SyntheticTask(KB, tokenizer, config, recipe=recipe,
                    total_steps=2, micro_batch=m), tc, tmp_path / precision, progress=False)
        t.fit()
        assert all(h["memory"] for h in t.history)
        losses[precision] = [h["loss"] for h in t.history]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_init_for_training_scales_with_fan_in(tokenizer):
    from memory3.train.init import init_for_training
    model = init_for_training(Memory3Model(Memory3Config.preset("small", vocab_size=512)), seed=3)
    wq, w2 = model.layers[0].attention.wq.weight, model.layers[0].feed_forward.w2.weight
    assert wq.std().item() == pytest.approx(wq.shape[1] ** -0.5, rel=0.05)
    assert w2.std().item() == pytest.approx(w2.shape[1] ** -0.5, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.layers[0].attention_norm.weight, torch.ones_like(model.layers[0].attention_norm.weight))
    again = init_for_training(Memory3Model(Memory3Config.preset("small", vocab_size=512)), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "warmup"], "--data is required"),
    (["--model-json", "{x"], "--model-json is not valid JSON"),
    (["--steps", "0"], "steps must be > 0"),
    (["--schedule", "linear"], "schedule must be one of"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, message):
    from memory3.train.run import main
    assert main(["--out", str(tmp_path / "run"), "--no-progress", "--n-train", "10", "--n-heldout", "2",
                 "--n-names", "20", "--vocab", "300", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


class NextTokenOracle(torch.nn.Module):
    """Logits that put all mass on the true next token (shift=1) or on the current one
    (shift=0): exact match must be 1 and 0."""

    def __init__(self, config, shift):
        super().__init__()
        self.config, self.shift, self.seen = config, shift, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, tokens, memories=None):
        self.seen.append(memories)
        nxt = torch.roll(tokens, -self.shift, dims=1)
        return torch.nn.functional.one_hot(nxt, self.config.vocab_size).float()


def test_exact_match_harness(tokenizer, monkeypatch):
    import memory3.train.evaluate as ev
    config = tiny(tokenizer, ref_len=64)
    encoded = []

    def fake_encode(model, refs, lens):
        encoded.append([tokenizer.decode(r[:int(n)].tolist()) for r, n in zip(refs, lens)])
        return torch.zeros(len(refs), *config.memory_shape)
    monkeypatch.setattr(ev, "encode_references", fake_encode)
    people = KB.heldout_people[:4]
    for mode in ("none", "memory", "rag"):
        assert ev.exact_match(NextTokenOracle(config, 1), tokenizer, KB, people, mode=mode, n_refs=3) == 1.0
        assert ev.exact_match(NextTokenOracle(config, 0), tokenizer, KB, people, mode=mode, n_refs=3) == 0.0
    qs = KB.questions_for(people)
    for wrong, right_first in ((False, False), (True, False), (False, True)):
        encoded.clear()
        oracle = NextTokenOracle(config, 1)
        ev.exact_match(oracle, tokenizer, KB, people, mode="memory", n_refs=3, wrong=wrong, right_first=right_first)
        bios = [b for batch in encoded for b in batch]
        assert len(bios) == 3 * len(qs) and oracle.seen[0].ids.shape[2] == 3
        for i, q in enumerate(qs):
            shown = bios[3 * i:3 * i + 3]
            right = KB.reference_text(KB.person(q.person_id))
            assert (right in shown) != wrong
            if right_first:
                assert shown[0] == right


def test_loss_reads_logits_only_at_the_targets(tokenizer):
    """LossModel projects to the vocabulary only where a target is: the same summed loss and
    gradients as the cross-entropy of the full logits [B, S, V]; logits_where selects rows in
    row-major order and refuses a wrong mask."""
    import torch.nn.functional as F

    from memory3.memory.encoder import encode_references
    from memory3.model import Memories
    from memory3.train.trainer import LossModel

    config = tiny(tokenizer)
    task = SyntheticTask(KB, tokenizer, config, recipe=SyntheticRecipe(rag_share=0.0, curriculum_frac=0.0),
                         total_steps=10, micro_batch=3, seed=4)
    b = task.batch(3, 0)
    losses, grads = [], []
    for full in (False, True):
        torch.manual_seed(0)
        model = Memory3Model(config)
        if full:
            memories = Memories.from_stacked(encode_references(model, b.refs, b.ref_lens), b.mem_ids)
            logits = model(b.tokens, memories)
            loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE, reduction="sum")
        else:
            loss = LossModel(model)(b.tokens, b.targets, b.refs, b.ref_lens, b.mem_ids)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    model = Memory3Model(config)
    where = b.targets != IGNORE
    with torch.no_grad():
        torch.testing.assert_close(model(b.tokens, logits_where=where), model(b.tokens)[where])
        for bad in (where[:, 1:], where.long()):
            with pytest.raises(ValueError, match="logits_where must be a bool tensor"):
                model(b.tokens, logits_where=bad)


def test_curriculum_holds_one_memory_first():
    """curriculum_start: one memory for that share of the steps, then the ramp to
    max_memories over curriculum_frac; the recipe is read from a TrainConfig's fields."""
    tc = TrainConfig.recipe_defaults("single-stage", steps=100, curriculum_start=0.4, curriculum_frac=0.2,
                                     right_first=0.8)
    recipe = SyntheticRecipe.from_config(tc)
    got = (recipe.curriculum_start, recipe.curriculum_frac, recipe.right_first, recipe.max_memories)
    assert got == (0.4, 0.2, 0.8, 5)
    assert [recipe.memories_at(s, 100) for s in (0, 39, 40, 45, 50, 55, 60, 99)] == [1, 1, 1, 2, 3, 4, 5, 5]
    assert SyntheticRecipe(curriculum_start=1.0).memories_at(99, 100) == 1
    with pytest.raises(ValueError, match="curriculum_start"):
        SyntheticRecipe(curriculum_start=1.5)

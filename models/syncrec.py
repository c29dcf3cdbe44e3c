"""SyNCRec: "Pacer and Runner", cooperative single- and cross-domain sequential learning (Park et al., SIGIR 2024)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import keras
from keras import ops

from models.base import CTRModel
from models.config import InputConfig, override, to_dict
from models.layers.contrastive import BilinearInfoNCE
from models.layers.masking import masked_softmax
from models.layers.moe import TOWER_NORMS, SequenceGates, SequentialExperts, TaskTowers, mix_experts
from models.registry import register
from xdctr import features as F

OBJECTIVES = ("bce", "bpr")
NTG_COEFFICIENTS = ("learned", "fixed")
CROSS_EXPERT_SHARE = 0.2  # j = 0.2 K (sec. 4.2.1)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SyNCRecConfig:
    """Config of `SyNCRec`.

    Attributes:
      inputs: input sizes shared by every model; needs at least 2 domains.
      embedding_dim: r, the width of the shared item table, the positions, the experts, the towers
        and so of the user representations that are dotted with item embeddings.
      num_experts: K, the number of Transformer experts in ACMoE (eq. 2, 4).
      num_cross_experts: j, the experts trained by the cross-domain task only (experts 0..j-1;
        experts j..K-1 are trained by the single-domain tasks only). 0 means round(0.2 K),
        clipped to [1, K - 1] (the paper's default). Must be in [1, K - 1] otherwise.
      num_layers: Transformer blocks per expert.
      num_heads: attention heads per block; must divide `embedding_dim`.
      dropout: dropout rate inside the experts.
      objective: "bce" (log loss of each impression, the default for CTR) or "bpr" (the paper's
        pairwise loss, eq. 8-9, over in-batch negatives; see `SyNCRec`).
      harmonic_factor: eta of eq. 18, the weight of the prediction losses; SC-MIM gets 1 - eta.
      ntg_alpha: alpha of eq. 11 (its initial value when `ntg_coefficients="learned"`); must be
        in (0, 2 * ntg_temperature).
      ntg_beta: beta of eq. 11 (initial value when learned); positive.
      ntg_temperature: delta of eq. 11, the softmax temperature; positive.
      ntg_coefficients: "learned" (alpha and beta are trainable, see `SyNCRec`) or "fixed".
      use_lc_ntg: False is the "w/o LC-NTG" ablation: the cross-domain loss is not reweighted.
      use_sc_mim: False is the "w/o SC-MIM" ablation: no mutual-information loss.
      use_acmoe: False is the "w/o ACMoE" ablation: a plain multi-gate MoE, no stop-gradients.
      item_bias: add a learned per-item bias b_v to both tasks' logits (not in eq. 19; off by
        default; see `SyNCRec`).
      tower_norm: where the towers' layer norm sits, "post" (after the residual, the default) or
        "pre" (before the FFN; see `layers.moe.TaskTowers`).
    """

    inputs: InputConfig = dataclasses.field(default_factory=InputConfig)
    embedding_dim: int = 16
    num_experts: int = 5
    num_cross_experts: int = 0
    num_layers: int = 1
    num_heads: int = 1
    dropout: float = 0.0
    objective: str = "bce"
    harmonic_factor: float = 0.99
    ntg_alpha: float = 1.0
    ntg_beta: float = 10.0
    ntg_temperature: float = 1.0
    ntg_coefficients: str = "learned"
    use_lc_ntg: bool = True
    use_sc_mim: bool = True
    use_acmoe: bool = True
    item_bias: bool = False
    tower_norm: str = "post"


def cross_expert_count(config: SyNCRecConfig) -> int:
    """j: `num_cross_experts`, or round(0.2 K) clipped to [1, K - 1] when it is 0."""
    if config.num_cross_experts:
        return config.num_cross_experts
    return min(max(1, round(CROSS_EXPERT_SHARE * config.num_experts)), max(1, config.num_experts - 1))


def _validate(config: SyNCRecConfig) -> None:
    for name in ("embedding_dim", "num_experts", "num_layers", "num_heads"):
        if getattr(config, name) <= 0:
            raise ValueError(f"`{name}` must be positive. Received: {name}={getattr(config, name)}")
    if config.embedding_dim % config.num_heads:
        raise ValueError(f"`num_heads` must divide `embedding_dim`={config.embedding_dim}. "
                         f"Received: num_heads={config.num_heads}")
    if config.inputs.num_domains < 2:
        raise ValueError(f"SyNCRec needs at least 2 domains. Received: domains={config.inputs.domains}")
    if config.num_cross_experts < 0:
        raise ValueError("`num_cross_experts` must be non-negative. "
                         f"Received: num_cross_experts={config.num_cross_experts}")
    if config.use_acmoe:
        if config.num_experts < 2:
            raise ValueError("ACMoE splits the experts between the tasks, so `num_experts` must be at least 2. "
                             f"Received: num_experts={config.num_experts}")
        if config.num_cross_experts and not 1 <= config.num_cross_experts < config.num_experts:
            raise ValueError(f"`num_cross_experts` must be in [1, num_experts - 1] = [1, {config.num_experts - 1}] "
                             f"(or 0 for round(0.2 K)). Received: num_cross_experts={config.num_cross_experts}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={config.dropout}")
    if config.tower_norm not in TOWER_NORMS:
        raise ValueError(f"`tower_norm` must be one of {TOWER_NORMS}. Received: tower_norm={config.tower_norm!r}")
    if config.objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}. Received: objective={config.objective!r}")
    if not 0.0 < config.harmonic_factor <= 1.0:
        raise ValueError(f"`harmonic_factor` must be in (0, 1]. Received: harmonic_factor={config.harmonic_factor}")
    if config.ntg_coefficients not in NTG_COEFFICIENTS:
        raise ValueError(f"`ntg_coefficients` must be one of {NTG_COEFFICIENTS}. "
                         f"Received: ntg_coefficients={config.ntg_coefficients!r}")
    for name in ("ntg_beta", "ntg_temperature"):
        if getattr(config, name) <= 0:
            raise ValueError(f"`{name}` must be positive. Received: {name}={getattr(config, name)}")
    if not 0.0 < config.ntg_alpha < 2 * config.ntg_temperature:
        raise ValueError(f"`ntg_alpha` must be in (0, 2 * ntg_temperature) = (0, {2 * config.ntg_temperature}). "
                         f"Received: ntg_alpha={config.ntg_alpha}")


@keras.saving.register_keras_serializable(package="xdctr")
class NegativeTransferWeights(keras.layers.Layer):
    """The relative negative transfer gaps lambda, state across batches (SyNCRec eq. 11).

        lambda <- softmax((alpha lambda + beta phi) / delta)   over the domains present in the batch

    phi (D,) are the batch's negative transfer gaps (eq. 10); a negative phi_d (the single-domain
    task beats the cross-domain one: negative transfer) lowers lambda_d. Domains absent from the
    batch keep their lambda and the present ones share the rest of the unit mass, so lambda always
    sums to 1 and a batch without domain d says nothing about it. phi is treated as a measurement
    (stop-gradient); the old lambda is state (no gradient).

    `learned=True` makes alpha and beta trainable through the loss that lambda weights, with
    alpha = 2 delta sigmoid(a) in (0, 2 delta) and beta = exp(b) > 0: beta > 0 keeps the paper's
    direction (negative transfer lowers the weight), and alpha < 2 delta makes the update a
    contraction in lambda (the softmax Jacobian has norm <= 1/2), so the memory term alone can
    never lock lambda onto one domain. `learned=False` keeps them constant.

    Args:
      num_domains: D >= 1.
      alpha, beta, temperature: eq. 11's alpha (in (0, 2 temperature)), beta (> 0), delta (> 0);
        initial values when learned.
      learned: whether alpha and beta are trainable.

    Call args:
      gaps: (D,) phi.
      present: (D,) bool, True for the domains with rows (pairs) in the batch.
    Returns:
      (D,) float32, the new lambda; the state is not assigned (the caller does, when training).
    """

    def __init__(self, num_domains, alpha=1.0, beta=1.0, temperature=1.0, learned=True, **kwargs):
        super().__init__(**kwargs)
        if num_domains <= 0:
            raise ValueError(f"`num_domains` must be positive. Received: num_domains={num_domains}")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive. Received: temperature={temperature}")
        if beta <= 0:
            raise ValueError(f"`beta` must be positive. Received: beta={beta}")
        if not 0 < alpha < 2 * temperature:
            raise ValueError(f"`alpha` must be in (0, 2 * temperature). Received: alpha={alpha}")
        self.num_domains = int(num_domains)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.learned = bool(learned)

    def build(self, gaps_shape=None, present_shape=None):
        self.lambdas = self.add_weight(shape=(self.num_domains,), initializer=keras.initializers.Constant(
            1.0 / self.num_domains), trainable=False, autocast=False, aggregation="mean", name="lambdas")
        if self.learned:
            share = self.alpha / (2 * self.temperature)
            self.alpha_logit = self.add_weight(shape=(), initializer=keras.initializers.Constant(
                math.log(share / (1 - share))), autocast=False, name="alpha_logit")
            self.log_beta = self.add_weight(shape=(), initializer=keras.initializers.Constant(math.log(self.beta)),
                                            autocast=False, name="log_beta")

    def coefficients(self):
        """(alpha, beta) as float32 scalars."""
        if not self.learned:
            return ops.convert_to_tensor(self.alpha, "float32"), ops.convert_to_tensor(self.beta, "float32")
        alpha = 2 * self.temperature * ops.sigmoid(ops.cast(self.alpha_logit, "float32"))
        return alpha, ops.exp(ops.cast(self.log_beta, "float32"))

    def call(self, gaps, present):
        present = ops.cast(present, "bool")
        old = ops.stop_gradient(ops.cast(self.lambdas, "float32"))  # (D,)
        alpha, beta = self.coefficients()
        logits = (alpha * old + beta * ops.stop_gradient(ops.cast(gaps, "float32"))) / self.temperature  # (D,)
        shares = masked_softmax(logits, present)  # (D,): over present domains, 0 elsewhere
        absent_mass = ops.sum(ops.where(present, ops.zeros_like(old), old))
        return ops.where(present, shares * (1.0 - absent_mass), old)

    def compute_output_shape(self, gaps_shape, present_shape=None):
        return tuple(gaps_shape)

    def get_config(self):
        config = super().get_config()
        config.update(num_domains=self.num_domains, alpha=self.alpha, beta=self.beta, temperature=self.temperature,
                      learned=self.learned)
        return config


@register("syncrec", SyNCRecConfig)
@keras.saving.register_keras_serializable(package="xdctr")
class SyNCRec(CTRModel):
    """SyNCRec (Park et al., "Pacer and Runner", SIGIR 2024) as a CTR model, for D >= 2 domains.

    With r = `embedding_dim`, K = `num_experts`, j = the cross-domain experts, and for a row with
    target item v in target domain t and label y:

    - Shared embedding (sec. 4.1): one item table M for all domains and one learnable position
      table P. The cross-domain sequence X is the mixed history (HISTORY_ITEM_IDS, HISTORY_MASK);
      the single-domain sequence X^d is DOMAIN_HISTORY_ITEM_IDS[:, d]. Each gets the paper's
      (SOS) start token (one learnable vector) right before its first click, so a sequence is
      never empty: E = [M[x] or SOS] + P, (B, L + 1, r) and (B, D, Ld + 1, r).
    - ACMoE (sec. 4.2, eq. 2-7): K experts, each its own `SASRecEncoder` (separate weights;
      `layers.moe.SequentialExperts`). D + 1 tasks, each with a gate over the experts
      g(E) = softmax(W_g vec(E)) (eq. 3) and a tower h (a residual feed-forward network with
      layer norm): one single-domain task per domain (gate g^d and tower h^d on X^d) and the
      cross-domain task (g^cross, h^cross on X). Stop-gradients (eq. 2, 4): experts 0..j-1 get
      no gradient from the single-domain tasks, experts j..K-1 none from the cross-domain task.
      The D single-domain sequences run through each expert in one call (stacked on the batch
      axis, (B D, Ld + 1, r)); the mixed sequence in another.
    - Representations: the user representation of a task is its tower's output at the last step
      (the most recent click, or SOS): u^d = h^d(f^d(E^d))_T (B, D, r) and
      u = h^cross(f^cross(E))_T (B, r).
    - Prediction (eq. 19, the served `ctr`): logit = u . M[v] + b^cross_t, ctr = sigmoid(logit).
      The single-domain task of domain t scores u^t . M[v] + b^single_t the same way.
    - Losses (eq. 8-18) on an impression batch; "per domain" means the rows whose target domain
      (DOMAIN) is d:
      * objective "bce": L^d_single and L^d_cross are the mean log loss of those rows' single
        (domain d) and cross logits (eq. 8-9 with the pairwise loss replaced by the impression
        log loss, since the data are impressions with labels).
      * objective "bpr": eq. 8-9's pairwise loss -log sigmoid(s(u, v+) - s(u, v-)) on the raw
        scores s (not on sigmoid(s), which eq. 8 writes but which saturates), for each clicked
        row (v+ = its target) against every other row of the batch with the same target domain
        and a different item (v- = that row's target: in-batch negatives from the same V^d,
        instead of uniform sampling), with the clicked row's own user representation; per-domain
        mean over its pairs. Per-domain biases would cancel in the differences, so this objective
        has none, and the served ctr is a ranking score, not a calibrated probability.
      * NTG (eq. 10): phi_d = L^d_single - L^d_cross, per batch. A domain without rows (pairs)
        in the batch contributes no loss and keeps its lambda (`NegativeTransferWeights`).
      * LC-NTG (eq. 11-12): lambda <- softmax((alpha lambda + beta phi) / delta), then
        L^lc = sum_d D lambda_d L^d_cross. lambda is a non-trainable variable (one entry per
        domain, starting uniform, updated every training batch and used in that batch). The
        factor D: lambda sums to 1 while eq. 18 sums the D single-domain losses, so read
        literally the cross-domain task (the one served) would weigh 1/D of them; with D lambda
        uniform weights give the plain per-domain sum.
      * SC-MIM (eq. 13-17), per domain d: InfoNCE (`layers.contrastive.BilinearInfoNCE`) between
        the single-domain view u^d and the cross-domain view at the same click: the cross
        tower's output at the most recent domain-d step of the mixed history (which is the last
        entry of X^d: both histories keep the most recent clicks). Anchors are those cross
        views, candidates the single views of every row of the batch (the other users are the
        negatives), rho(U, V) = sigmoid(U^T W^H V). Rows without a domain-d click in either
        history take no part. L^d_SC-MIM is the mean over the anchors of d.
      * Total (eq. 18): eta (sum_d L^d_single + L^lc) + (1 - eta) sum_d L^d_SC-MIM with
        eta = `harmonic_factor`; without SC-MIM it is sum_d L^d_single + L^lc.
      `call(training=True)` returns the task logits and the SC-MIM losses next to `ctr`;
      `compute_loss` reads the labels from y["ctr"] and computes the total (sample weights are
      not used). Evaluation (`training=False`) returns only `ctr` and its loss is the compiled
      CTR loss, so validation loss and early stopping track what is served. `compute_metrics`
      hands the compiled metrics `ctr` alone (Keras builds them from the first y_pred it sees,
      and under TensorFlow that is a training step's, extra keys included).

    lambda across backends: `compute_loss` assigns the new lambda when `training` is True (never
    in evaluation). Under TensorFlow (the Trainer) the assign runs inside the train step. Under
    JAX, Keras 3.15's trainer runs `compute_loss` in a StatelessScope and reads every
    non-trainable variable back from that scope into the step's new state, so the assign is kept
    too (checked by `tests/test_syncrec.py::test_lambda_is_updated_under_the_jax_backend`); a
    Keras version that stopped doing so would leave lambda uniform under JAX, which that test
    would catch. With several replicas (MirroredStrategy) each replica computes lambda from its
    shard of the batch and the variable keeps their mean (aggregation "mean").

    alpha and beta (eq. 11, "learnable"). The only loss term that depends on them is eq. 12
    through lambda, and its gradient is not what eq. 8-12 intend: with phi fixed,
    d L^lc / d beta = (D / delta) Cov_lambda(phi, L_cross) and
    d L^lc / d alpha = (D / delta) Cov_lambda(lambda_old, L_cross), i.e. "move weight onto the
    domains whose cross loss is lowest", whose optimum is a one-hot lambda; the paper wants the
    weight to follow the NTG. So with `ntg_coefficients="learned"` (default) they are trained by
    that gradient but constrained so it can only tune how strongly and how persistently lambda
    follows phi, never invert or lock it: beta = exp(b) > 0 (negative transfer always lowers the
    weight) and alpha in (0, 2 delta) (the update stays a contraction in lambda); phi and the old
    lambda carry no gradient, so the model cannot lower L^lc by worsening its single-domain
    tasks. Descent raises beta when the domains with the larger gap also have the lower cross
    loss, and lowers it otherwise; alpha gets no gradient while lambda is uniform. With Adam each
    step moves b and a by about the learning rate. `ntg_coefficients="fixed"` keeps them at the
    config values (the reference code's behaviour: there they get no gradient).

    Other choices where the paper is vague:
    - Experts reuse `SASRecEncoder` (pre-layer-norm blocks, bias-free Q/K/V, no output
      projection W^F, ReLU FFN, final layer norm) rather than eq. 5-7's post-norm MSA with W^F
      and a GELU FFN. Positions are indexed by recency (row -1 is the last step), so one table P
      of max(L, Ld) + 1 rows serves both sequence lengths.
    - Per-domain biases b^cross_t and b^single_t with "bce" (a base rate per domain, which a bare
      dot product cannot learn); eq. 19 has none.
    - Item bias: off by default (eq. 19 has none). `item_bias=True` adds one learned b_v per item
      bucket (zeros at the start) to the single- and cross-domain logits alike, as the item table
      M is shared, and under "bpr" too (there it does not cancel: v+ and v- differ). A bare dot
      product can carry an item's popularity only through a direction every user vector shares;
      the bias carries it directly.
    - Sizes: r = 16 (the paper's best on Amazon, Fig. 3), K = 5 experts of one single-head block
      (the paper's Telco setting has K = 5), on CPU about twice MAN's step time; the experts
      dominate it.
    - The towers see only the steps the losses use (the last step; for SC-MIM also the last
      step of each domain in the mixed history): the gates weigh whole sequences, so mixing and
      the towers commute with picking steps.
    - SC-MIM pairs one step per user and domain (the most recent common click), not whole
      subsequences; eq. 16's sum over u- includes the positive (eq. 15's form).
    - eta, delta, alpha, beta: the paper gives no values. Defaults: eta 0.99, delta 1, alpha 1,
      beta 10 (phi is a difference of per-row mean log losses, typically |phi| < 0.1). eta: each
      InfoNCE is about log(batch) (5.5 at the Trainer's 256) against about log 2 per prediction
      loss, so at eta = 0.8 SC-MIM was half of eq. 18 and the served cross-domain task got half
      the gradient; at 0.99 it is about 4% at initialisation. Measured (`xdctr benchmark train
      --epochs 1 --set harmonic_factor=ETA`, seeds 0-2, AUC of the served ctr): generated logs
      (2,000 users) 0.685 (eta 0.8), 0.725 (0.95), 0.728 (0.99), 0.728 (no SC-MIM); a third of
      the food-kitchen users 0.520, 0.532, 0.538, 0.528.
    - The served path (`encode_context`/`score`, `call(training=False)`) runs only the
      cross-domain task: `encode_context` returns u (B, r), which does not depend on the domain,
      and `score` adds the candidate domain's bias, so candidates may mix domains.

    Ranking objectives (`set_ranking_objective`, the leave-one-out protocol's training): the
    sampled softmax (or full softmax) of `models.base` replaces `objective` in both tasks. Each
    click row's single-domain and cross-domain logits u^t . M[v] + b_t are contrasted with the
    same kind of logits of uniform items of the row's domain (drawn separately for the two tasks);
    L^d_single and L^d_cross become the mean softmax cross-entropy of domain d's click rows, and
    NTG, LC-NTG, SC-MIM and eq. 18 apply to them, with one change: the NTG phi_d enters eq. 11
    multiplied by log 2 / log(1 + N_d), N_d the negatives of domain d (its catalogue under the full
    softmax). A softmax over 257 candidates starts at a loss of log 257 = 5.5 where the log loss
    starts at log 2, and its per-domain gaps are as many times larger: unscaled, beta = 10 turned
    gaps of about 2 into lambda = [1, 9e-12] on food-kitchen's leave-one-out train part, and the
    starved domain's served (cross-domain) task never learned (Kitchen HR@10 0.041 against Food's
    0.246). The scale puts phi back on the log loss's scale, where beta was chosen; the log-loss
    objectives are unchanged. Measured, it is not enough on its own: with the scale, the learned
    beta rose from 10 to 41 and lambda still ended at [1, 9e-6] (Kitchen HR@10 0.063); the
    feedback (a starved domain's cross loss stays high, so its gap falls further) remains.
    `use_lc_ntg=False` (no lambda) is the setting to use with the ranking objectives until that
    is solved (`set_ranking_objective` logs a warning otherwise). `ntg_coefficients="fixed"` (beta
    stays 10) does not solve it either: lambda ended at [0.88, 0.12] and Kitchen HR@10 at 0.155,
    against 0.183 without LC-NTG (seed 0, item vocabulary; README). This is the paper's own setting (eq.
    8-9 rank a next item against negatives of its domain) with the softmax over several negatives
    in place of one pairwise term. `score_items` (one matrix product) gives the full softmax.
    Validation scores the served cross-domain task only (`models.base`'s loss on its logits).

    Ablations (paper sec. 5.5): `use_lc_ntg=False` sums the per-domain cross losses unweighted
    and has no lambda, alpha or beta; `use_sc_mim=False` drops the loss and W^H;
    `use_acmoe=False` removes every stop-gradient (a plain multi-gate MoE). The forward pass of
    all three equals the full model's at the same weights; they differ in training.

    Inputs: see `models.base.CTRModel`; uses ITEM_ID, DOMAIN, HISTORY_ITEM_IDS, HISTORY_DOMAINS,
    HISTORY_MASK, DOMAIN_HISTORY_ITEM_IDS and DOMAIN_HISTORY_MASK.
    """


    _gap_scale = None  # per domain, under a ranking objective: see `set_ranking_objective`

    def __init__(self, config: SyNCRecConfig, **kwargs):
        kwargs.setdefault("name", "syncrec")
        super().__init__(**kwargs)
        if isinstance(config, Mapping):
            config = override(SyNCRecConfig(), config)
        _validate(config)
        self.config = config
        dim, num_domains, num_experts = config.embedding_dim, config.inputs.num_domains, config.num_experts
        self.num_domains = num_domains
        self.num_cross_experts = cross_expert_count(config)
        cross_len = config.inputs.history_length + 1  # with (SOS)
        single_len = config.inputs.domain_history_length + 1

        # Sec. 4.1: shared item table M, positions P (by recency), the (SOS) token.
        self.item_embedding = keras.layers.Embedding(config.inputs.item_buckets, dim, name="item_embedding")
        self.positions = self.add_weight(shape=(max(cross_len, single_len), dim), initializer="uniform",
                                         name="positions")
        self.start_token = self.add_weight(shape=(dim,), initializer="uniform", name="start_token")
        # Sec. 4.2: K experts, D + 1 gates and towers.
        self.experts = SequentialExperts(num_experts, config.num_layers, config.num_heads, dropout=config.dropout,
                                         name="experts")
        self.single_gates = SequenceGates(num_domains, num_experts, name="single_gates")
        self.cross_gate = SequenceGates(1, num_experts, name="cross_gate")
        self.single_towers = TaskTowers(num_domains, norm=config.tower_norm, name="single_towers")
        self.cross_tower = TaskTowers(1, norm=config.tower_norm, name="cross_tower")
        self.item_bias = (keras.layers.Embedding(config.inputs.item_buckets, 1, embeddings_initializer="zeros",
                                                 name="item_bias") if config.item_bias else None)
        self.single_bias = self.cross_bias = None  # "bpr": biases cancel in s+ - s-, so there are none
        if config.objective == "bce":
            self.single_bias = self.add_weight(shape=(num_domains,), initializer="zeros", name="single_bias")
            self.cross_bias = self.add_weight(shape=(num_domains,), initializer="zeros", name="cross_bias")
        # Sec. 4.3-4.4.
        self.sc_mim = BilinearInfoNCE(name="sc_mim") if config.use_sc_mim else None
        self.ntg = (NegativeTransferWeights(num_domains, config.ntg_alpha, config.ntg_beta, config.ntg_temperature,
                                            learned=config.ntg_coefficients == "learned", name="ntg")
                    if config.use_lc_ntg else None)
        with keras.name_scope(self.name):  # every weight exists before any call, whichever path runs first
            self.item_embedding.build((None,))
            if self.item_bias is not None:
                self.item_bias.build((None,))
            self.experts.build((None, None, dim))
            self.single_gates.build((None, num_domains, single_len, dim))
            self.cross_gate.build((None, 1, cross_len, dim))
            self.single_towers.build((None, num_domains, dim))
            self.cross_tower.build((None, 1, dim))
            if self.sc_mim is not None:
                self.sc_mim.build((None, num_domains, dim))
            if self.ntg is not None:
                self.ntg.build()

    # ------------------------------------------------------------------ ACMoE

    def stop_gradient_flags(self, task: str) -> tuple:
        """Per expert, whether `task` ("single" or "cross") sends it no gradient (eq. 2, 4)."""
        if not self.config.use_acmoe:
            return (False,) * self.config.num_experts
        j = self.num_cross_experts
        if task == "single":
            return tuple(k < j for k in range(self.config.num_experts))
        return tuple(k >= j for k in range(self.config.num_experts))

    def _embed(self, ids, mask):
        """Left-padded ids (N, T) and mask (N, T) -> E (N, T + 1, r) with (SOS), mask (N, T + 1).

        (SOS) sits right before the first real step (the last step when the sequence is empty);
        padded steps of E are zeros.
        """
        mask = ops.cast(mask, "bool")
        length = ids.shape[1] + 1
        count = ops.sum(ops.cast(mask, "int32"), axis=1)  # (N,): real steps
        ids = ops.concatenate([ops.zeros_like(ids[:, :1]), ids], axis=1)  # (N, T + 1)
        item_mask = ops.concatenate([ops.zeros_like(mask[:, :1]), mask], axis=1)  # (N, T + 1)
        steps = ops.arange(length, dtype="int32")
        start = ops.expand_dims(steps, 0) == ops.expand_dims(length - 1 - count, 1)  # (N, T + 1): the (SOS) step
        embedded = self.item_embedding(ids)  # (N, T + 1, r)
        start_token = ops.reshape(ops.cast(self.start_token, embedded.dtype), (1, 1, -1))  # (1, 1, r)
        embedded = ops.where(ops.expand_dims(start, -1), start_token, embedded)
        rows = self.positions.shape[0]
        embedded = embedded + ops.cast(ops.convert_to_tensor(self.positions)[rows - length:], embedded.dtype)
        full_mask = ops.logical_or(item_mask, start)  # (N, T + 1)
        return embedded * ops.expand_dims(ops.cast(full_mask, embedded.dtype), -1), full_mask

    def single_representations(self, inputs, training=False):
        """u^d for every domain d: (B, D, r) (eq. 2)."""
        num_domains, dim = self.num_domains, self.config.embedding_dim
        ids = inputs[F.DOMAIN_HISTORY_ITEM_IDS]  # (B, D, Ld)
        length = ids.shape[-1]
        flat_ids = ops.reshape(ids, (-1, length))  # (B D, Ld)
        flat_mask = ops.reshape(ops.cast(inputs[F.DOMAIN_HISTORY_MASK], "bool"), (-1, length))  # (B D, Ld)
        embedded, mask = self._embed(flat_ids, flat_mask)  # (B D, Ld + 1, r), (B D, Ld + 1)
        gates = self.single_gates(ops.reshape(embedded, (-1, num_domains, length + 1, dim)),
                                  ops.reshape(mask, (-1, num_domains, length + 1)))  # (B, D, K): g^d(E^d), eq. 3
        gates = ops.reshape(gates, (-1, self.config.num_experts))  # (B D, K)
        experts = self.experts(embedded, mask, training=training)  # (B D, K, Ld + 1, r)
        mixed = mix_experts(experts[:, :, -1], gates, self.stop_gradient_flags("single"))  # (B D, r): f^d, last step
        return self.single_towers(ops.reshape(mixed, (-1, num_domains, dim)))  # (B, D, r): h^d

    def cross_representations(self, inputs, training=False, per_domain=False):
        """u = h^cross(f^cross(E))_T (B, r) (eq. 4); with `per_domain`, also the cross views of SC-MIM.

        Returns u, or (u, views (B, D, r), valid (B, D) bool) where views[:, d] is the cross
        tower's output at the most recent domain-d step of the mixed history (valid: there is one).
        """
        ids = inputs[F.HISTORY_ITEM_IDS]  # (B, L)
        history_mask = ops.cast(inputs[F.HISTORY_MASK], "bool")  # (B, L)
        embedded, mask = self._embed(ids, history_mask)  # (B, L + 1, r), (B, L + 1)
        gates = self.cross_gate(ops.expand_dims(embedded, 1), ops.expand_dims(mask, 1))[:, 0]  # (B, K), eq. 3
        experts = self.experts(embedded, mask, training=training)  # (B, K, L + 1, r)
        flags = self.stop_gradient_flags("cross")
        if not per_domain:
            mixed = mix_experts(experts[:, :, -1], gates, flags)  # (B, r)
            return self.cross_tower(ops.expand_dims(mixed, 1))[:, 0]  # (B, r)
        length = ids.shape[1] + 1
        domains = ops.concatenate([ops.zeros_like(inputs[F.HISTORY_DOMAINS][:, :1]), inputs[F.HISTORY_DOMAINS]],
                                  axis=1)  # (B, L + 1), aligned with E
        item_mask = ops.concatenate([ops.zeros_like(history_mask[:, :1]), history_mask], axis=1)  # (B, L + 1)
        in_domain = ops.logical_and(
            ops.expand_dims(item_mask, -1),
            ops.expand_dims(ops.cast(domains, "int32"), -1) == ops.arange(self.num_domains, dtype="int32"),
        )  # (B, L + 1, D)
        steps = ops.reshape(ops.arange(length, dtype="int32"), (1, -1, 1))  # (1, L + 1, 1)
        last = ops.max(ops.where(in_domain, steps, -1), axis=1)  # (B, D): most recent domain-d step, -1 if none
        valid = last >= 0
        picks = ops.concatenate([ops.full_like(last[:, :1], length - 1), ops.where(valid, last, length - 1)],
                                axis=1)  # (B, 1 + D): the last step, then each domain's
        select = ops.one_hot(picks, length, dtype=experts.dtype)  # (B, 1 + D, L + 1)
        picked = ops.einsum("bpt,bktr->bkpr", select, experts)  # (B, K, 1 + D, r)
        mixed = mix_experts(picked, gates, flags)  # (B, 1 + D, r)
        towers = self.cross_tower(ops.expand_dims(mixed, 2))[:, :, 0]  # (B, 1 + D, r)
        return towers[:, 0], towers[:, 1:], valid

    # ------------------------------------------------------------------ prediction

    def _item_bias(self, items):
        """b_v of (N,) items: (N,) float32, or 0 without `item_bias`."""
        if self.item_bias is None:
            return 0.0
        return ops.cast(ops.squeeze(self.item_bias(items), -1), "float32")

    def _logit(self, users, item, domain, bias):
        """u . M[v] + b_t (+ b_v): (B, r), (B,), (B,) -> (B,) float32 (eq. 19); no b_t when `bias` is None."""
        targets = ops.cast(self.item_embedding(item), "float32")  # (B, r)
        dot = ops.sum(ops.cast(users, "float32") * targets, axis=-1) + self._item_bias(item)  # (B,)
        if bias is None:
            return dot
        return dot + ops.take(ops.cast(bias, "float32"), ops.cast(domain, "int32"), axis=0)

    def encode_context(self, inputs, training=False):
        return {"user": self.cross_representations(inputs, training=training)}  # (B, r)

    def score(self, context, item, domain, training=False):
        return self._logit(context["user"], item, domain, self.cross_bias)  # (B,)

    def set_ranking_objective(self, domain_items, negatives: int = None, seed: int = 0) -> None:
        super().set_ranking_objective(domain_items, negatives, seed)
        # log 2 / the loss of an uninformed score per domain (a softmax over 1 + N candidates).
        sizes = [negatives + 1 if negatives is not None else max(len(items), 2) for items in domain_items]
        self._gap_scale = [math.log(2) / math.log(n) for n in sizes]
        if self.ntg is not None:
            logger.warning("SyNCRec under a ranking objective with LC-NTG on: on food-kitchen's leave-one-out "
                           "protocol its weights starved a domain (lambda [1, 9e-6] learned, [0.88, 0.12] with "
                           "fixed coefficients; Kitchen HR@10 0.063 and 0.155 against 0.183 without LC-NTG). "
                           "Train with --set use_lc_ntg=false (see the README).")

    def clear_ranking_objective(self) -> None:
        super().clear_ranking_objective()
        self._gap_scale = None

    def score_items(self, context, items, domains, training=False):
        """u . M[v] + b_t (+ b_v) of every row against the same N items: (B, r), (N,), (N,) -> (B, N)."""
        targets = ops.cast(self.item_embedding(items), "float32")  # (N, r)
        logits = ops.matmul(ops.cast(context["user"], "float32"), ops.transpose(targets))  # (B, N)
        if self.item_bias is not None:
            logits = logits + ops.expand_dims(self._item_bias(items), 0)
        if self.cross_bias is None:
            return logits
        return logits + ops.expand_dims(ops.take(ops.cast(self.cross_bias, "float32"), ops.cast(domains, "int32"),
                                                 axis=0), 0)

    def call(self, inputs, training=False):
        if not training:
            return super().call(inputs, training=False)  # {ctr}: the cross-domain task only
        config = self.config
        item, domain = inputs[F.ITEM_ID], ops.cast(inputs[F.DOMAIN], "int32")
        singles = self.single_representations(inputs, training=training)  # (B, D, r)
        if config.use_sc_mim:
            cross, views, valid = self.cross_representations(inputs, training=training, per_domain=True)
        else:
            cross = self.cross_representations(inputs, training=training)  # (B, r)
        one_hot = ops.one_hot(domain, self.num_domains, dtype=singles.dtype)  # (B, D)
        single = ops.einsum("bd,bdr->br", one_hot, singles)  # (B, r): u^t of each row's target domain
        cross_logit = self._logit(cross, item, domain, self.cross_bias)
        outputs = {
            F.SERVING_OUTPUT: ops.sigmoid(cross_logit),
            "cross_logit": cross_logit,  # (B,)
            "single_logit": self._logit(single, item, domain, self.single_bias),  # (B,)
        }
        if self._ranking is not None:  # a ranking objective replaces `objective` for both tasks
            outputs["cross_ranking_logits"] = self.ranking_logits({"user": cross}, cross_logit, inputs, training)
            outputs["single_ranking_logits"] = self.ranking_logits({"user": single}, outputs["single_logit"], inputs,
                                                                   training)  # (B, 1 + N) each
        elif config.objective == "bpr":
            targets = ops.cast(self.item_embedding(item), "float32")  # (B, r)
            # (B, B): row i's user representation against every row's target, u_i . M[v_j].
            bias = ops.expand_dims(self._item_bias(item), 0) if self.item_bias is not None else 0.0  # (1, B): b_{v_j}
            outputs["cross_scores"] = ops.matmul(ops.cast(cross, "float32"), ops.transpose(targets)) + bias
            outputs["single_scores"] = ops.matmul(ops.cast(single, "float32"), ops.transpose(targets)) + bias  # (B, B)
        if config.use_sc_mim:
            has_single = ops.any(ops.cast(inputs[F.DOMAIN_HISTORY_MASK], "bool"), axis=-1)  # (B, D)
            mim_mask = ops.logical_and(valid, has_single)  # (B, D)
            outputs["sc_mim"] = self.sc_mim(singles, views, mim_mask)  # (B, D), eq. 16
            outputs["sc_mim_mask"] = mim_mask
        return outputs

    # ------------------------------------------------------------------ losses

    def task_losses(self, inputs, labels, outputs) -> dict:
        """Per-domain losses of a training batch from `call(training=True)` outputs.

        Returns a dict of (D,) float32 tensors: "single" (L^d_single), "cross" (L^d_cross),
        "present" (bool: domain d has rows, pairs for "bpr", click rows under a ranking objective), and with SC-MIM "sc_mim"
        (L^d_SC-MIM). Absent domains get 0.
        """
        labels = ops.cast(ops.reshape(labels, (-1,)), "float32")  # (B,)
        domain = ops.cast(inputs[F.DOMAIN], "int32")  # (B,)
        rows = ops.one_hot(domain, self.num_domains, dtype="float32")  # (B, D)
        if "cross_ranking_logits" in outputs:  # the ranking objective: softmax cross-entropy of each click
            clicks = rows * ops.expand_dims(ops.cast(labels > 0.5, "float32"), 1)  # (B, D)
            counts = ops.sum(clicks, axis=0)  # (D,)
            totals = {}
            for task in ("single", "cross"):
                logits = ops.cast(outputs[f"{task}_ranking_logits"], "float32")  # (B, 1 + N)
                per_row = ops.logsumexp(logits, axis=-1) - logits[:, 0]  # (B,)
                totals[task] = ops.einsum("bd,b->d", clicks, per_row)  # (D,)
        elif self.config.objective == "bce":
            counts = ops.sum(rows, axis=0)  # (D,)
            per_row = {task: ops.binary_crossentropy(labels, outputs[f"{task}_logit"], from_logits=True)
                       for task in ("single", "cross")}  # (B,) each
            totals = {task: ops.einsum("bd,b->d", rows, loss) for task, loss in per_row.items()}  # (D,) each
        else:
            item = inputs[F.ITEM_ID]
            pairs = ops.logical_and(
                ops.expand_dims(domain, 1) == ops.expand_dims(domain, 0),
                ops.expand_dims(item, 1) != ops.expand_dims(item, 0),
            )  # (B, B): same target domain, different item
            pairs = ops.cast(ops.logical_and(pairs, ops.expand_dims(labels > 0.5, 1)), "float32")  # anchor i clicked
            counts = ops.einsum("bd,b->d", rows, ops.sum(pairs, axis=1))  # (D,)
            totals = {}
            for task in ("single", "cross"):
                scores = outputs[f"{task}_scores"]  # (B, B)
                positive = ops.expand_dims(ops.diagonal(scores), 1)  # (B, 1): s(u_i, v_i)
                pair_loss = ops.softplus(scores - positive)  # -log sigmoid(s+ - s-), (B, B)
                totals[task] = ops.einsum("bd,b->d", rows, ops.sum(pairs * pair_loss, axis=1))  # (D,)
        denominator = ops.maximum(counts, 1.0)
        losses = {task: total / denominator for task, total in totals.items()}
        losses["present"] = counts > 0
        if self.config.use_sc_mim:
            weights = ops.cast(outputs["sc_mim_mask"], "float32")  # (B, D)
            losses["sc_mim"] = (ops.sum(outputs["sc_mim"] * weights, axis=0)
                                / ops.maximum(ops.sum(weights, axis=0), 1.0))  # (D,)
        return losses

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Eq. 18 on training outputs (updating lambda when training); the compiled loss otherwise."""
        if not isinstance(y_pred, Mapping) or "cross_logit" not in y_pred:
            return super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        labels = y[F.SERVING_OUTPUT] if isinstance(y, Mapping) else y
        losses = self.task_losses(x, labels, y_pred)
        if self.ntg is not None:
            gaps = losses["single"] - losses["cross"]  # eq. 10
            if self._gap_scale is not None and "cross_ranking_logits" in y_pred:
                gaps = gaps * ops.convert_to_tensor(self._gap_scale, "float32")  # to the log loss's scale
            lambdas = self.ntg(gaps, losses["present"])  # eq. 11
            if training:
                self.ntg.lambdas.assign(ops.stop_gradient(lambdas))
            cross = self.num_domains * ops.sum(lambdas * losses["cross"])  # eq. 12
        else:
            cross = ops.sum(losses["cross"])
        prediction = ops.sum(losses["single"]) + cross
        if not self.config.use_sc_mim:
            return prediction
        eta = self.config.harmonic_factor
        return eta * prediction + (1.0 - eta) * ops.sum(losses["sc_mim"])  # eq. 18

    def get_config(self):
        return {"config": to_dict(self.config)}

    @classmethod
    def from_config(cls, config):
        return cls(override(SyNCRecConfig(), config["config"]))

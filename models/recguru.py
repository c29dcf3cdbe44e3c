"""RecGURU: adversarial learning of generalised user representations (Li et al., WSDM 2022)."""

from __future__ import annotations

import dataclasses
import logging

import keras
from keras import ops

from models import config as config_lib
from models.base import DEFAULT_PHASE, CTRModel, _num_replicas
from models.config import InputConfig
from models.layers.critic import DomainCritic, cross_domain_interpolates, gradient_penalty, one_vs_rest_wasserstein
from models.layers.sampled_softmax import SAMPLERS, SampledSoftmaxLoss
from models.layers.transformer import MEMORY_ATTENTION, TransformerDecoder, TransformerEncoder
from models.registry import register
from xdctr import features as F

logger = logging.getLogger(__name__)

AUTOENCODER, ADVERSARIAL, RECOMMENDER = "autoencoder", "adversarial", "recommender"
GURU_PHASES = (AUTOENCODER, ADVERSARIAL)  # phases that train the GURU module (Algorithm 1, phases 1-2)
RECOMMENDER_PHASES = (RECOMMENDER, DEFAULT_PHASE)  # the base class's "ctr" is the recommender phase
GUR_SOURCES = ("all_domains", "target_domain")
OBJECTIVES = ("bce", "bpr", "bce+bpr")

# Names of the component losses in fit's logs, and the phases that report them.
CTR_LOSS, BPR_LOSS = "ctr_loss", "bpr_loss"
RECONSTRUCTION_LOSS, ALIGNMENT_LOSS = "reconstruction_loss", "alignment_loss"
CRITIC_LOSS, WASSERSTEIN, GRADIENT_PENALTY = "critic_loss", "wasserstein_distance", "gradient_penalty"


@dataclasses.dataclass(frozen=True)
class RecGURUConfig:
    """Config of `RecGURU`.

    Attributes:
      inputs: input sizes shared by every model.
      embedding_dim: d, the width of item/position embeddings, of every Transformer and of the
        user representations (paper: 64).
      num_layers: blocks of the encoder, of each decoder and of each CDSRec (paper: 3 or 6).
      num_heads: attention heads of every attention (paper: 2); must divide `embedding_dim`.
      dropout: rate of every dropout in the Transformers.
      short_term_length: m + 1 in eq. 10, the recent clicks of the target domain that CDSRec reads;
        0 means the whole per-domain history (domain_history_length).
      gur_source: what CDSRec's cross-attention attends to: "all_domains" (the generalised
        representations of every domain where the user has history) or "target_domain" (only the
        target domain's, eq. 10 read literally).
      decoder_memory: how each decoder reads its one memory entry h^d: "projection" (h^d W^V, what
        attention over one key computes, without the query and key weights that could never learn)
        or "attention" (the multi-head cross-attention layer as the paper draws it).
      softmax_negatives: sampled negatives of the reconstruction softmax (supplement 6.1.3:
        neg_softmax = 20 or 10); 0 is the full softmax over item_buckets.
      negative_sampler: proposal of the sampled softmax: "in_batch" (default: the domain's real
        clicks in the batch, with their in-batch frequency as Q), "uniform" or "log_uniform"
        (over every hash bucket of the domain's table, most of which no item hashes to).
      objective: the recommender phase's loss: "bce" (the compiled CTR log loss on impressions),
        "bpr" (eq. 12 on clicked rows only) or "bce+bpr" (their sum).
      bpr_negatives: |N_s| of eq. 12, random items of the target domain per step.
      critic_hidden_units: hidden layers of the domain critic (paper: 3 x 2d, plus the output).
      critic_iters: CRITIC_ITERS, critic steps per generator step (paper: 5).
      critic_learning_rate, critic_beta_1, critic_beta_2: the critic's own Adam (paper's opt_dis:
        1e-4, 0.5, 0.9).
      gradient_penalty_weight: lambda of the WGAN-GP penalty (Gulrajani et al.: 10).
      adversarial_weight: weight of -L_dis (the Wasserstein estimate) in the generator loss (eq. 13).
      reconstruction_weight: weight of L_rec (eq. 5, 13).
      alignment_weight: weight of L_l2 (eq. 9, 13).
      use_adversarial: False is the AutoRec-style ablation: no critic, phase 2 trains
        reconstruction (and alignment) only.
      use_alignment: False drops the overlap alignment (eq. 9).
      autoencoder_share, adversarial_share, recommender_share: shares of the training steps of
        Algorithm 1's three phases; a phase with share 0 is skipped (the recommender's must be
        positive). Defaults 0.1 / 0.2 / 0.7: the served recommender gets most of the budget, the
        GURU phases are its warm-up.
    """

    inputs: InputConfig = dataclasses.field(default_factory=InputConfig)
    embedding_dim: int = 32
    num_layers: int = 1
    num_heads: int = 2
    dropout: float = 0.0
    short_term_length: int = 0
    gur_source: str = "all_domains"
    decoder_memory: str = "projection"
    softmax_negatives: int = 20
    negative_sampler: str = "in_batch"
    objective: str = "bce"
    bpr_negatives: int = 20
    critic_hidden_units: tuple = (64, 64, 64)
    critic_iters: int = 5
    critic_learning_rate: float = 1e-4
    critic_beta_1: float = 0.5
    critic_beta_2: float = 0.9
    gradient_penalty_weight: float = 10.0
    adversarial_weight: float = 1.0
    reconstruction_weight: float = 1.0
    alignment_weight: float = 1.0
    use_adversarial: bool = True
    use_alignment: bool = True
    autoencoder_share: float = 0.1
    adversarial_share: float = 0.2
    recommender_share: float = 0.7


def _validate(config: RecGURUConfig) -> None:
    for name in ("embedding_dim", "num_layers", "num_heads", "critic_iters", "bpr_negatives"):
        if getattr(config, name) <= 0:
            raise ValueError(f"`{name}` must be positive. Received: {name}={getattr(config, name)}")
    if config.embedding_dim % config.num_heads:
        raise ValueError(f"`num_heads` must divide `embedding_dim`={config.embedding_dim}. "
                         f"Received: num_heads={config.num_heads}")
    if config.inputs.num_domains < 2:
        raise ValueError(f"RecGURU needs at least 2 domains. Received: domains={config.inputs.domains}")
    if config.inputs.item_buckets < 3:
        raise ValueError(f"`item_buckets` must be at least 3 (padding plus two items). "
                         f"Received: item_buckets={config.inputs.item_buckets}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={config.dropout}")
    if not 0 <= config.short_term_length <= config.inputs.domain_history_length:
        raise ValueError(f"`short_term_length` must be in [0, domain_history_length="
                         f"{config.inputs.domain_history_length}]. "
                         f"Received: short_term_length={config.short_term_length}")
    for name, choices in (("gur_source", GUR_SOURCES), ("objective", OBJECTIVES), ("negative_sampler", SAMPLERS),
                          ("decoder_memory", MEMORY_ATTENTION)):
        if getattr(config, name) not in choices:
            raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={getattr(config, name)!r}")
    if config.softmax_negatives < 0:
        raise ValueError(f"`softmax_negatives` must be non-negative. "
                         f"Received: softmax_negatives={config.softmax_negatives}")
    if not config.critic_hidden_units or any(u <= 0 for u in config.critic_hidden_units):
        raise ValueError(f"`critic_hidden_units` must be a non-empty list of positive sizes. "
                         f"Received: critic_hidden_units={config.critic_hidden_units}")
    if config.critic_learning_rate <= 0:
        raise ValueError(f"`critic_learning_rate` must be positive. "
                         f"Received: critic_learning_rate={config.critic_learning_rate}")
    for name in ("critic_beta_1", "critic_beta_2"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={getattr(config, name)}")
    for name in ("gradient_penalty_weight", "adversarial_weight", "reconstruction_weight", "alignment_weight",
                 "autoencoder_share", "adversarial_share"):
        if getattr(config, name) < 0:
            raise ValueError(f"`{name}` must be non-negative. Received: {name}={getattr(config, name)}")
    if config.recommender_share <= 0:
        raise ValueError(f"`recommender_share` must be positive. "
                         f"Received: recommender_share={config.recommender_share}")


def overlap_alignment_loss(representations, present):
    """Eq. 9 for D domains: the L2 distance between one user's representations of different domains.

    For every row whose user has history in at least two domains (an "overlapped user"), the mean
    of ||h_a - h_b||_2 over the domain pairs a < b present in the row; then the mean over those rows
    (0 when there is none). For D = 2 a row's term is exactly eq. 9.

    Args:
      representations: (batch, D, dim) float, h^d of every domain.
      present: (batch, D) bool, True where the row has history in domain d.
    Returns:
      scalar float32.
    """
    h = ops.cast(representations, "float32")
    weights = ops.cast(present, "float32")  # (batch, D)
    num_domains = h.shape[1]
    diff = ops.expand_dims(h, 2) - ops.expand_dims(h, 1)  # (batch, D, D, dim)
    distance = ops.sqrt(ops.maximum(ops.sum(ops.square(diff), axis=-1), 1e-12))  # (batch, D, D); finite gradient
    upper = ops.triu(ops.ones((num_domains, num_domains), "float32"), k=1)  # pairs a < b
    pairs = ops.expand_dims(weights, 2) * ops.expand_dims(weights, 1) * upper  # (batch, D, D)
    count = ops.sum(pairs, axis=(1, 2))  # (batch,)
    per_row = ops.sum(pairs * distance, axis=(1, 2)) / ops.maximum(count, 1.0)  # (batch,)
    overlapped = ops.cast(count > 0, "float32")
    return ops.sum(overlapped * per_row) / ops.maximum(ops.sum(overlapped), 1.0)


def _served(outputs):
    """The served part of `call`'s outputs: the compiled loss and metrics see only {ctr}."""
    return {F.SERVING_OUTPUT: outputs[F.SERVING_OUTPUT]} if isinstance(outputs, dict) else outputs


@register("recguru", RecGURUConfig)
@keras.saving.register_keras_serializable(package="xdctr")
class RecGURU(CTRModel):
    """RecGURU (Li et al., WSDM 2022) as a CTR model for D >= 2 domains.

    Inputs: DOMAIN_HISTORY_ITEM_IDS (B, D, Ld) and DOMAIN_HISTORY_MASK (B, D, Ld) (row d: the
    user's recent clicks in domain d, left-padded), ITEM_ID (B,) and DOMAIN (B,). The mixed-domain
    history is not read: the paper works on per-domain sequences, and the per-domain histories hold
    the same clicks.

    GURU (generalised user representation unit, sec. 3.3):
    - Embed (eq. 4): per-domain item tables I^d (stacked as one table, row d * item_buckets + id)
      and per-domain positional tables P^d ((Ld + 1) rows, indexed by recency: row Ld - 1 is the
      most recent click, row Ld the appended token); a learned [eos] token per domain is appended
      to every domain's sequence: (e_1, ..., e_Ld, e) = I^d[s^d] + P^d[:Ld], eos_d + P^d[Ld].
    - Encoder (eq. 4): one bidirectional Transformer shared by all domains. The D sequences of a
      batch are stacked into the batch axis (one encoder call on (B * D, Ld + 1, dim)); the output
      at [eos] is the user representation h^d (B, D, dim). A domain where the user has no history
      yields the [eos]-only representation, which is marked absent (`present`) and never used as
      the user's representation below.
    - Decoders (eq. 4-5): one causal Transformer decoder per domain, teacher-forced: step t reads
      the previous click (a learned per-domain [bos] token before the first one) plus P^d[t],
      cross-attends to h^d, and predicts click t. L_rec is the softmax cross-entropy over the
      domain's item table, tied to I^d (logits e_v . decoder output), sampled with
      `softmax_negatives` negatives and logQ correction (supplement 6.1.3, see
      `layers.SampledSoftmaxLoss`). The negatives of domain d are drawn from the batch's real
      domain-d clicks (`negative_sampler="in_batch"`), Q their in-batch frequency: the model
      cannot know up front which of the item_buckets rows hold real items, and with hashed ids
      most rows hold none, so uniform negatives over the table are mostly empty rows that any
      decoder output can tell from the true item without reading h^d. It is averaged over the real clicks of all domains in the batch
      (the paper's eq. 5 sums over positions; the mean keeps the loss scale independent of Ld and
      D).
    - Domain critic (eq. 8, 13), WGAN-GP as the paper's implementation (sec. 4.2): for D >= 2 an
      MLP with one head per domain and one-vs-rest Wasserstein estimates
      W = mean_k (E[f_k(h^k)] - E[f_k(h^j), j != k]) over the present representations of the batch
      (`layers.critic.one_vs_rest_wasserstein`; for D = 2 this is one critic f_0 - f_1). The
      critic minimises -W + lambda_gp GP; GP penalises (||grad f_k(x)|| - 1)^2 at random points x
      between a domain-k representation and another domain's representation of a shifted row.
      The encoder's adversarial term is -L_dis = +W (eq. 13: L = L_rec - L_dis + L_l2).
    - Overlap alignment (eq. 9, `use_alignment`): rows with history in two or more domains;
      mean over present domain pairs of ||h^a - h^b||_2 (`overlap_alignment_loss`).

    CDSRec (cross-domain sequential recommender, sec. 3.4, eq. 10-11, supplement 6.1.2): one
    decoder-structured causal Transformer per domain over the domain's last m clicks
    (`short_term_length`) plus a learned per-domain query token at the end (positions: the last
    m + 1 rows of P^d). Its cross-attention attends to the generalised representations: by default
    those of every domain where the user has history ("all_domains"), so a user who is cold in the
    target domain still reads the representations of their other domains (an empty target-domain
    sequence leaves only the query token, whose output is the preference); "target_domain"
    attends to h^d only (eq. 10 literally). The output at the query token is the current
    preference q^d (eq. 10).

    CTR adaptation (the paper ranks next items with HR/NDCG): eq. 11's score becomes a logit,
    logit = q^d . I^d[v] + b_d for target item v in target domain d, with a learned bias per
    domain (calibration of the base rate); ctr = sigmoid(logit), trained with the compiled
    binary cross-entropy on impressions. `objective="bpr"` trains eq. 12 instead, on clicked rows
    with `bpr_negatives` uniform random items of the target domain:
    -log sigmoid(logit_v) - log(1 - sigmoid(mean_{v'} logit_{v'})); "bce+bpr" adds both. Validation
    loss is always the CTR log loss of the served output.

    Training (Algorithm 1), `training_phases()` ->
    ("autoencoder", s1), ("adversarial", s2), ("recommender", s3), run in order by
    `components/trainer/task.py:fit`:
    1. "autoencoder": L_rec on the GURU weights (item tables, positions, [eos]/[bos] tokens,
       encoder, decoders) with the compiled optimizer. The CDSRec, the query tokens, the domain
       biases and the critic are untouched.
    2. "adversarial": per batch, CRITIC_ITERS critic steps (`critic_iters`) with the critic's own
       Adam (`critic_learning_rate`, betas), then one generator step on the GURU weights with the
       critic fixed: L_rec + adversarial_weight * W + alignment_weight * L_l2. The critic steps
       reuse the batch's representations (computed once, without gradient: the encoder does not
       change during critic steps) with fresh random interpolation points per step; the
       algorithm's fresh batch per critic step would cost CRITIC_ITERS extra encoder passes.
    3. "recommender": the CTR objective on everything it reaches (item tables, positions, [eos],
       encoder, CDSRec, query tokens, domain biases); decoders, [bos] and critic are untouched.
       The encoder is fine-tuned together with CDSRec, not frozen: the item table is shared with
       eq. 11's target embedding, and the impressions are the only supervised signal.
    The base class's default phase "ctr" (plain `fit`/`train_on_batch` without `set_phase`) is
    the recommender phase.

    Backends: the three phases are custom `train_step`s on the TensorFlow backend (the Trainer's),
    each updating only its own weights. The critic step needs the gradient of the critic with
    respect to its input (the penalty), so on other backends `train_step` falls back to Keras's
    own step on `compute_loss`: phases 1 and 3 optimise the same losses as above, phase 2 only
    L_rec + L_l2 (no critic, no adversarial term: AutoRec-style). Keras's step hands every
    trainable weight to the compiled optimizer; those a phase's loss does not reach get zero
    gradients, which Adam ignores unless they carry momentum from an earlier phase (the decoders
    in phase 3, which do not serve).

    Logs: fit reports the phase's objective as `loss` and its parts (Keras `Mean` metrics):
    reconstruction_loss in phase 1; reconstruction_loss, alignment_loss, critic_loss (-W + lambda GP),
    wasserstein_distance (W) and gradient_penalty (GP), averaged over the critic steps, in phase 2; in the
    recommender phase `loss` is the CTR log loss, with ctr_loss and bpr_loss beside it when the
    objective includes eq. 12 (bpr_loss is 0 in validation, which scores the served output only).
    The compiled CTR metrics (AUC) are reported in the recommender phase only.

    Other choices where the paper is vague:
    - Hyper-parameters default small for CPU training: d = 32, one block, two heads, FFN width d
      (the paper: 64, 3-6 blocks, FFN 512).
    - The hashed item ids carry no frequency order (log-uniform assumes ids sorted by frequency)
      and most hash buckets are empty, so the sampled softmax proposal defaults to in-batch
      negatives (see the reconstruction loss above).
    - Step budget: the paper trains the phases to convergence each; under one step budget the
      served recommender phase gets 70% of the steps by default and the GURU phases 10% + 20%
      as its warm-up (it had half before). How much the warm-up is worth depends on the log: on
      amazon-five-domains (63k impressions) it is what makes the model learn, while on
      food-kitchen (688k) the network without it (`autoencoder_share=0`, `adversarial_share=0`)
      scored 0.033 GAUC higher (README, "The validation holdout"). The default stays Algorithm 1.
    - Critic hidden activation: leaky ReLU. GP lines run between a domain-k representation and a
      random other domain's representation of another row (see `layers.critic`).
    - The supplement's separate Adams per phase (pre-training 1.0 with a schedule, fine-tuning
      1e-3) become the Trainer's one compiled optimizer for every non-critic step; only the critic
      has its own (wrapped in a `LossScaleOptimizer` under mixed precision).
    - Each decoder reads the one vector h^d ("another multi-head attention layer over the user
      representation"). Attention over one key has softmax weight 1, so it is h^d W^V, and its
      W^Q, W^K and query layer norm could never learn: by default (`decoder_memory="projection"`)
      the decoder block computes h^d W^V directly; "attention" keeps the literal layer. CDSRec,
      whose memory holds several domains, uses real cross-attention.
    - The autoencoder reconstructs every domain's history of every row; an impression row is not
      deduplicated per user, so a user's sequence is reconstructed once per impression.

    Ablations: `use_adversarial=False` (no critic: AutoRec-style autoencoder + CDSRec, the paper's
    "+Auto"), `use_alignment=False` (no eq. 9).

    Serving split: `encode_context` runs the encoder and every domain's CDSRec, giving the
    preference of every domain, {"preference": (B, D, dim)}; `score` picks the candidate's domain
    row and dots it with the candidate's embedding in that domain's table, so a batch of
    candidates may mix domains.
    """

    supports_ranking_objective = False  # its own objectives (config.objective) replace the CTR loss

    def __init__(self, config: RecGURUConfig, **kwargs):
        super().__init__(**kwargs)
        _validate(config)
        self.config = config
        inputs = config.inputs
        dim, num_domains, length = config.embedding_dim, inputs.num_domains, inputs.domain_history_length
        self.num_domains = num_domains
        self.short_term_length = config.short_term_length or length
        blocks = dict(num_layers=config.num_layers, num_heads=config.num_heads, dropout=config.dropout)

        # Embed (eq. 4): I^d stacked, P^d by recency with a last row for the appended token.
        self.item_embedding = keras.layers.Embedding(num_domains * inputs.item_buckets, dim, name="item_embedding")
        self.positions = self.add_weight(shape=(num_domains, length + 1, dim), initializer="uniform", name="positions")
        self.eos_tokens = self.add_weight(shape=(num_domains, dim), initializer="uniform", name="eos_tokens")
        self.bos_tokens = self.add_weight(shape=(num_domains, dim), initializer="uniform", name="bos_tokens")
        # GURU encoder (shared) and decoders (per domain), eq. 4-5.
        self.encoder = TransformerEncoder(**blocks, name="encoder")
        self.decoders = [TransformerDecoder(**blocks, memory_attention=config.decoder_memory, name=f"decoder_{d}")
                         for d in range(num_domains)]
        self.reconstruction_softmax = SampledSoftmaxLoss(inputs.item_buckets, config.softmax_negatives,
                                                         config.negative_sampler, first_class=1,
                                                         name="reconstruction_softmax")
        # CDSRec (eq. 10-11), per domain.
        self.query_tokens = self.add_weight(shape=(num_domains, dim), initializer="uniform", name="query_tokens")
        self.recommenders = [TransformerDecoder(**blocks, name=f"cdsrec_{d}") for d in range(num_domains)]
        self.domain_bias = self.add_weight(shape=(num_domains,), initializer="zeros", name="domain_bias")
        self.seed_generator = keras.random.SeedGenerator(name="recguru_seed_generator")

        self.ctr_tracker = keras.metrics.Mean(name=CTR_LOSS)
        self.bpr_tracker = keras.metrics.Mean(name=BPR_LOSS)
        self.reconstruction_tracker = keras.metrics.Mean(name=RECONSTRUCTION_LOSS)
        self.alignment_tracker = keras.metrics.Mean(name=ALIGNMENT_LOSS)
        self.critic_tracker = keras.metrics.Mean(name=CRITIC_LOSS)
        self.wasserstein_tracker = keras.metrics.Mean(name=WASSERSTEIN)
        self.penalty_tracker = keras.metrics.Mean(name=GRADIENT_PENALTY)
        self.build()

    def build(self, input_shape=None):
        """Creates every weight now: phases 1-2 use layers that `call` never reaches (decoders,
        critic), and the train step must not create variables while it is traced.

        The domain critic (eq. 8) and its own optimizer come last, so that with the same seed the
        served network starts from the same weights with or without the critic (`use_adversarial`).
        """
        config = self.config
        length, dim = config.inputs.domain_history_length, config.embedding_dim
        self.item_embedding.build((None,))
        self.encoder.build((None, length + 1, dim))
        for decoder in self.decoders:
            decoder.build((None, length, dim))
        for recommender in self.recommenders:
            recommender.build((None, self.short_term_length + 1, dim))
        self.reconstruction_softmax.build((None, length, dim))
        if config.use_adversarial:
            self.critic = DomainCritic(self.num_domains, config.critic_hidden_units, name="critic")
            self.critic.build((None, self.num_domains, dim))
            critic_optimizer = keras.optimizers.Adam(config.critic_learning_rate, beta_1=config.critic_beta_1,
                                                     beta_2=config.critic_beta_2)
            if keras.mixed_precision.global_policy().name == "mixed_float16":
                critic_optimizer = keras.optimizers.LossScaleOptimizer(critic_optimizer)
            critic_optimizer.build(self.critic.trainable_variables)
            self.critic_optimizer = critic_optimizer
        self.built = True

    # ------------------------------------------------------------------ phases

    def training_phases(self):
        config = self.config
        phases = ((AUTOENCODER, config.autoencoder_share), (ADVERSARIAL, config.adversarial_share),
                  (RECOMMENDER, config.recommender_share))
        return tuple((name, share) for name, share in phases if share > 0)

    def set_phase(self, name):
        super().set_phase(name)
        self.test_function = None  # `evaluate` computes the phase's loss too
        logger.info("%s: phase `%s` optimises %s", self.name, name, self.phase_objective(name))

    def phase_objective(self, name):
        """One line saying what phase `name` optimises (for the logs)."""
        config = self.config
        if name == AUTOENCODER:
            return "L_rec (eq. 5) on the GURU encoder, decoders and embeddings"
        if name == ADVERSARIAL:
            terms = ["L_rec"]
            if config.use_adversarial and keras.backend.backend() == "tensorflow":
                terms.append(f"{config.adversarial_weight:g} * W (critic fixed)")
            if config.use_alignment:
                terms.append(f"{config.alignment_weight:g} * L_l2")
            critic = (f"{config.critic_iters} critic steps (-W + {config.gradient_penalty_weight:g} * GP), then "
                      if config.use_adversarial and keras.backend.backend() == "tensorflow" else "")
            return f"{critic}{' + '.join(terms)} (eq. 13) on the GURU encoder, decoders and embeddings"
        return f"the CTR objective `{config.objective}` (eq. 11-12) on the encoder, embeddings and CDSRec"

    def _shown_metrics(self):
        """Names of the component losses that the current phase computes."""
        config = self.config
        if self.phase == AUTOENCODER:
            return {RECONSTRUCTION_LOSS}
        if self.phase == ADVERSARIAL:
            shown = {RECONSTRUCTION_LOSS}
            if config.use_alignment:
                shown.add(ALIGNMENT_LOSS)
            if config.use_adversarial and keras.backend.backend() == "tensorflow":
                shown |= {CRITIC_LOSS, WASSERSTEIN, GRADIENT_PENALTY}
            return shown
        # With the default "bce" objective the loss is the CTR loss: no separate entry, so that
        # `evaluate` returns one number as for every other model.
        return {CTR_LOSS, BPR_LOSS} if config.objective != "bce" else set()

    def get_metrics_result(self):
        """Keras's metric results, restricted to what the current phase computes.

        In the GURU phases only `loss` and the phase's component losses are reported: the compiled
        CTR loss and metrics (e.g. AUC) are not computed there (nor even built before the first
        recommender phase).
        """
        shown = self._shown_metrics()
        components = {CTR_LOSS, BPR_LOSS, RECONSTRUCTION_LOSS, ALIGNMENT_LOSS, CRITIC_LOSS, WASSERSTEIN,
                      GRADIENT_PENALTY}
        results = {}
        for metric in self.metrics:
            if self.phase in GURU_PHASES:
                keep = metric is self._loss_tracker or metric.name in shown
            else:
                keep = metric.name not in components or metric.name in shown
            if not keep:
                continue
            result = metric.result()
            if isinstance(result, dict):
                results.update(result)
            else:
                results[metric.name] = result
        return results

    def guru_variables(self):
        """Weights of phases 1-2's generator step: embeddings, tokens, encoder, decoders."""
        variables = list(self.item_embedding.trainable_variables)
        variables += [self.positions, self.eos_tokens, self.bos_tokens]
        variables += self.encoder.trainable_variables
        for decoder in self.decoders:
            variables += decoder.trainable_variables
        return variables

    def recommender_variables(self):
        """Weights of the recommender phase: embeddings, positions, [eos], encoder, CDSRec, biases."""
        variables = list(self.item_embedding.trainable_variables)
        variables += [self.positions, self.eos_tokens, self.query_tokens, self.domain_bias]
        variables += self.encoder.trainable_variables
        for recommender in self.recommenders:
            variables += recommender.trainable_variables
        return variables

    def critic_variables(self):
        return list(self.critic.trainable_variables) if self.config.use_adversarial else []

    # ------------------------------------------------------------------ GURU

    def generalised_representations(self, inputs, training=False):
        """Eq. 4 for every domain at once.

        Returns a dict: "h" (B, D, dim) the encoder output at each domain's [eos]; "present"
        (B, D) bool, True where the user has history in the domain; "items" (B, D, Ld, dim) the
        embedded clicks with positions; "ids" (B, D, Ld) int32 and "mask" (B, D, Ld) bool.
        """
        config = self.config
        num_domains, length, dim = self.num_domains, config.inputs.domain_history_length, config.embedding_dim
        ids = ops.cast(inputs[F.DOMAIN_HISTORY_ITEM_IDS], "int32")  # (B, D, Ld)
        mask = ops.cast(inputs[F.DOMAIN_HISTORY_MASK], "bool")  # (B, D, Ld)
        offsets = ops.reshape(ops.arange(num_domains, dtype="int32") * config.inputs.item_buckets, (1, -1, 1))
        items = self.item_embedding(ids + offsets)  # (B, D, Ld, dim): I^d[s^d]
        positions = ops.cast(self.positions, items.dtype)  # (D, Ld + 1, dim)
        items = items + ops.expand_dims(positions[:, :length], 0)  # (B, D, Ld, dim)
        eos = ops.cast(self.eos_tokens, items.dtype) + positions[:, length]  # (D, dim)
        eos = ops.zeros_like(items[:, :, :1]) + ops.expand_dims(eos, 1)  # (B, D, 1, dim)
        sequence = ops.concatenate([items, eos], axis=2)  # (B, D, Ld + 1, dim)
        sequence_mask = ops.concatenate([mask, ops.ones_like(mask[:, :, :1])], axis=2)  # (B, D, Ld + 1)
        flat = ops.reshape(sequence, (-1, length + 1, dim))  # (B * D, Ld + 1, dim)
        flat_mask = ops.reshape(sequence_mask, (-1, length + 1))  # (B * D, Ld + 1)
        encoded = self.encoder(flat, flat_mask, training=training)  # (B * D, Ld + 1, dim)
        h = ops.reshape(encoded[:, -1], (-1, num_domains, dim))  # (B, D, dim): h^d at [eos]
        return {"h": h, "present": ops.any(mask, axis=-1), "items": items, "ids": ids, "mask": mask}

    def _only_domain(self, present, d):
        """(B, D) bool: `present` in column d, False elsewhere."""
        column = ops.arange(self.num_domains) == d  # (D,)
        return ops.logical_and(present, ops.expand_dims(column, 0))

    def reconstruction_loss(self, guru, training=False):
        """L_rec (eq. 5): mean cross-entropy over the real clicks of every domain; scalar float32."""
        config = self.config
        buckets, dim = config.inputs.item_buckets, config.embedding_dim
        length = config.inputs.domain_history_length
        ids, mask, h, present = guru["ids"], guru["mask"], guru["h"], guru["present"]
        positions = ops.cast(self.positions, h.dtype)  # (D, Ld + 1, dim)
        table = self.item_embedding.embeddings
        total = ops.zeros((), "float32")
        for d in range(self.num_domains):
            previous = ops.concatenate([ops.zeros_like(ids[:, d, :1]), ids[:, d, :-1]], axis=1)  # (B, Ld)
            previous_mask = ops.concatenate([ops.zeros_like(mask[:, d, :1]), mask[:, d, :-1]], axis=1)  # (B, Ld)
            embedded = self.item_embedding(previous + d * buckets)  # (B, Ld, dim)
            bos = ops.reshape(ops.cast(self.bos_tokens[d], embedded.dtype), (1, 1, dim))
            decoder_inputs = ops.where(ops.expand_dims(previous_mask, -1), embedded, bos) + positions[d, :length]
            # Cross-attention over h^d only: the memory is every domain's h with all but domain d masked
            # (the same numbers as a one-entry memory, without a softmax over a size-1 axis).
            decoded = self.decoders[d](decoder_inputs, mask[:, d], h, self._only_domain(present, d),
                                       training=training)  # (B, Ld, dim)
            cross_entropy = self.reconstruction_softmax(decoded, ids[:, d], mask[:, d], table=table,
                                                        offset=d * buckets)  # (B, Ld)
            total = total + ops.sum(cross_entropy)
        count = ops.sum(ops.cast(mask, "float32"))
        return total / ops.maximum(count, 1.0)

    def guru_objective(self, inputs, training=False):
        """The phase-1/2 loss without the critic: L_rec (+ L_l2 in phase 2); returns (loss, guru).

        Updates the reconstruction/alignment metrics. The loss is scaled for the distribution
        strategy's replicas, as Keras scales the compiled loss.
        """
        config = self.config
        guru = self.generalised_representations(inputs, training=training)
        reconstruction = self.reconstruction_loss(guru, training=training)
        self.reconstruction_tracker.update_state(reconstruction)
        loss = config.reconstruction_weight * reconstruction
        if self.phase == ADVERSARIAL and config.use_alignment:
            alignment = overlap_alignment_loss(guru["h"], guru["present"])
            self.alignment_tracker.update_state(alignment)
            loss = loss + config.alignment_weight * alignment
        return loss / _num_replicas(), guru

    # ------------------------------------------------------------------ CDSRec and scoring

    def encode_context(self, inputs, training=False):
        config = self.config
        length, short = config.inputs.domain_history_length, self.short_term_length
        guru = self.generalised_representations(inputs, training=training)
        h, present, items, mask = guru["h"], guru["present"], guru["items"], guru["mask"]
        positions = ops.cast(self.positions, items.dtype)  # (D, Ld + 1, dim)
        preferences = []
        for d in range(self.num_domains):
            recent = items[:, d, length - short:]  # (B, m, dim), positions included
            recent_mask = mask[:, d, length - short:]  # (B, m)
            query = ops.cast(self.query_tokens[d], items.dtype) + positions[d, length]  # (dim,)
            query = ops.zeros_like(recent[:, :1]) + query  # (B, 1, dim)
            sequence = ops.concatenate([recent, query], axis=1)  # (B, m + 1, dim)
            sequence_mask = ops.concatenate([recent_mask, ops.ones_like(recent_mask[:, :1])], axis=1)  # (B, m + 1)
            memory_mask = present if config.gur_source == "all_domains" else self._only_domain(present, d)  # (B, D)
            out = self.recommenders[d](sequence, sequence_mask, h, memory_mask, training=training)
            preferences.append(out[:, -1])  # (B, dim): q^d at the query token, eq. 10
        return {"preference": ops.stack(preferences, axis=1)}  # (B, D, dim)

    def _target_preference(self, context, domain):
        """q of each row's target domain: (B, dim)."""
        preference = context["preference"]  # (B, D, dim)
        select = ops.one_hot(ops.cast(domain, "int32"), self.num_domains, dtype=preference.dtype)  # (B, D)
        return ops.sum(preference * ops.expand_dims(select, -1), axis=1)

    def _logits(self, preference, item, domain):
        """Eq. 11 plus the domain bias: q . I^d[v] + b_d for (B, dim), (B, ...) items, (B,) domains."""
        domain = ops.cast(domain, "int32")
        offsets = domain * self.config.inputs.item_buckets  # (B,)
        while len(offsets.shape) < len(item.shape):
            offsets = ops.expand_dims(offsets, -1)
        embedded = self.item_embedding(ops.cast(item, "int32") + offsets)  # (B, ..., dim)
        while len(preference.shape) < len(embedded.shape):
            preference = ops.expand_dims(preference, 1)  # (B, 1, dim)
        dots = ops.cast(ops.sum(preference * embedded, axis=-1), "float32")  # (B, ...)
        bias = ops.take(ops.cast(self.domain_bias, "float32"), domain, axis=0)  # (B,)
        while len(bias.shape) < len(dots.shape):
            bias = ops.expand_dims(bias, -1)
        return dots + bias

    def score(self, context, item, domain, training=False):
        return self._logits(self._target_preference(context, domain), item, domain)  # (B,)

    def call(self, inputs, training=False):
        context = self.encode_context(inputs, training=training)
        domain = inputs[F.DOMAIN]
        preference = self._target_preference(context, domain)
        logits = self._logits(preference, inputs[F.ITEM_ID], domain)  # (B,)
        outputs = {F.SERVING_OUTPUT: ops.sigmoid(logits)}
        if training and self.config.objective != "bce" and self.phase in RECOMMENDER_PHASES:
            negatives = keras.random.randint((self.config.bpr_negatives,), 1, self.config.inputs.item_buckets,
                                             seed=self.seed_generator)  # (S,)
            negatives = ops.zeros_like(ops.expand_dims(ops.cast(domain, "int32"), -1)) + negatives  # (B, S)
            outputs["logit"] = logits
            outputs["negative_logits"] = self._logits(preference, negatives, domain)  # (B, S)
        return outputs

    # ------------------------------------------------------------------ losses

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The current phase's loss (every backend; the TF train step adds the critic terms).

        GURU phases: `guru_objective`. Recommender phases: the compiled CTR loss and/or eq. 12.
        """
        if self.phase in GURU_PHASES:
            loss, _ = self.guru_objective(x, training=training)
            return loss
        ctr = super().compute_loss(x=x, y=y, y_pred=_served(y_pred), sample_weight=sample_weight, training=training)
        self.ctr_tracker.update_state(ctr * _num_replicas())
        if self.config.objective == "bce" or "negative_logits" not in (y_pred or {}):
            return ctr  # validation is always the CTR log loss of the served output
        labels = ops.cast(y[F.SERVING_OUTPUT], "float32")  # (B,)
        mean_negative = ops.mean(y_pred["negative_logits"], axis=-1)  # (B,)
        per_row = ops.softplus(-y_pred["logit"]) + ops.softplus(mean_negative)  # eq. 12
        bpr = ops.sum(labels * per_row) / ops.maximum(ops.sum(labels), 1.0)
        self.bpr_tracker.update_state(bpr)
        bpr = bpr / _num_replicas()
        return bpr if self.config.objective == "bpr" else ctr + bpr

    # ------------------------------------------------------------------ training (TensorFlow)

    def train_step(self, *args, **kwargs):
        """Phase-dependent step: see the class docstring. Non-TF backends use Keras's own step."""
        if keras.backend.backend() != "tensorflow":
            return super().train_step(*args, **kwargs)
        (data,) = args
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.phase in GURU_PHASES:
            return self._guru_step(x)
        return self._recommender_step(x, y, sample_weight)

    def make_train_function(self, force=False):
        """Builds the compiled optimizer on every trainable weight before the step is traced.

        Without a distribution strategy Keras's TensorFlow trainer builds the optimizer lazily on
        the first `apply_gradients`; the phases update different subsets of the weights, so the
        first phase alone would define the optimizer's variables.
        """
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        return super().make_train_function(force=force)

    def _track_loss(self, loss, x):
        import tensorflow as tf

        if self._loss_tracker is not None:  # Keras's "loss" metric (set by compile)
            self._loss_tracker.update_state(loss * _num_replicas(), sample_weight=tf.shape(x[F.ITEM_ID])[0])

    def _apply(self, optimizer, tape, loss, variables):
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))

    def _recommender_step(self, x, y, sample_weight):
        import tensorflow as tf

        variables = self.recommender_variables()
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._track_loss(loss, x)
            scaled = self.optimizer.scale_loss(loss)
        self._apply(self.optimizer, tape, scaled, variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _guru_step(self, x):
        import tensorflow as tf

        config = self.config
        variables = self.guru_variables()
        with tf.GradientTape() as tape:
            loss, guru = self.guru_objective(x, training=True)
            if self.phase == ADVERSARIAL and config.use_adversarial:
                h, present = guru["h"], guru["present"]
                with tape.stop_recording():
                    fixed = tf.stop_gradient(h)
                    for _ in range(config.critic_iters):
                        self.critic_step(fixed, present)
                # Generator term with the critic fixed: -L_dis = +W (eq. 13).
                distance = one_vs_rest_wasserstein(self.critic(h), present)
                loss = loss + config.adversarial_weight * distance / _num_replicas()
            self._track_loss(loss, x)
            scaled = self.optimizer.scale_loss(loss)
        self._apply(self.optimizer, tape, scaled, variables)
        return self.get_metrics_result()

    def critic_step(self, h, present):
        """One WGAN-GP critic update on representations h (B, D, dim); TensorFlow only.

        Critic loss: -W + gradient_penalty_weight * GP (see `layers.critic`). Returns
        (critic loss, W, GP) as scalars and updates their metrics.
        """
        import tensorflow as tf

        config = self.config
        variables = self.critic.trainable_variables
        eye = ops.eye(self.num_domains, dtype="float32")
        with tf.GradientTape() as tape:
            distance = one_vs_rest_wasserstein(self.critic(h), present)
            points, valid = cross_domain_interpolates(h, present, self.seed_generator)
            with tf.GradientTape() as inner:
                inner.watch(points)
                scores = ops.cast(self.critic(points), "float32")  # (B, D, D)
                own = ops.sum(scores * eye)  # sum over (b, k) of f_k(x[b, k])
            penalty = gradient_penalty(inner.gradient(own, points), valid)
            critic_loss = -distance + config.gradient_penalty_weight * penalty
            scaled = self.critic_optimizer.scale_loss(critic_loss / _num_replicas())
        self._apply(self.critic_optimizer, tape, scaled, variables)
        self.critic_tracker.update_state(critic_loss)
        self.wasserstein_tracker.update_state(distance)
        self.penalty_tracker.update_state(penalty)
        return critic_loss, distance, penalty

    # ------------------------------------------------------------------ config

    def get_config(self):
        return {"config": config_lib.to_dict(self.config)}

    @classmethod
    def from_config(cls, config):
        return cls(config_lib.override(RecGURUConfig(), config["config"]))

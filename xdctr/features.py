"""The feature contract: every feature name, shape, dtype and padding value, defined once.

Ingestion writes these features, the trainer and evaluator read them, and the scoring service
serves models whose `serving_default` signature parses them. Import the names from here; never
spell a feature name as a string literal elsewhere.

Ids are strings in the TFRecords. Models see integer indices: `components/trainer_input.py`
hashes ids into buckets inside the TensorFlow graph (training input and exported signatures
alike), so serving needs no vocabulary artifact and unseen ids never fail a request.
"""

from __future__ import annotations

import dataclasses

# Click-log fields (one impression per record).
LOG_TS = "ts"
LOG_USER_ID = "user_id"
LOG_DOMAIN = "domain"
LOG_ITEM_ID = "item_id"
LOG_CLICKED = "clicked"
LOG_ORACLE_CTR = "oracle_ctr"  # generated logs only; never a model feature
LOG_REQUIRED_FIELDS = (LOG_TS, LOG_USER_ID, LOG_DOMAIN, LOG_ITEM_ID, LOG_CLICKED)

# tf.Example features written by ingestion.
USER_ID = "user_id"  # bytes, scalar
ITEM_ID = "item_id"  # bytes, scalar: the target item
DOMAIN = "domain"  # bytes, scalar: the target domain
TIMESTAMP = "ts"  # int64, scalar: epoch seconds of the impression
HISTORY_ITEM_IDS = "hist_item_ids"  # bytes, (history_length,): clicks strictly before ts
HISTORY_DOMAINS = "hist_domains"  # bytes, (history_length,): domain of each history click
HISTORY_LENGTH = "hist_length"  # int64, scalar: number of real (non-padding) history entries
HISTORY_TIMESTAMPS = "hist_ts"  # int64, (history_length,): ts of each history click; 0 is padding
# Per-domain histories: row d holds the user's most recent clicks in domain `domains[d]`.
DOMAIN_HISTORY_ITEM_IDS = "domain_hist_item_ids"  # bytes, (num_domains, domain_history_length)
DOMAIN_HISTORY_LENGTHS = "domain_hist_lengths"  # int64, (num_domains,): real entries per row
TARGET_DOMAIN_CLICKS = "target_domain_clicks"  # int64, scalar: earlier clicks in the target domain
OTHER_DOMAIN_CLICKS = "other_domain_clicks"  # int64, scalar: earlier clicks in other domains
ORACLE_CTR = "oracle_ctr"  # float, scalar: true click probability (generated data; eval only)
# Evaluation slices (not model inputs):
COLD_START = "cold_start"  # int64, scalar: 1 when no earlier click in the target domain but some elsewhere
ACTIVITY_BUCKET = "activity_bucket"  # bytes, scalar: earlier clicks in any domain, bucketed
ACTIVITY_BUCKETS = ((0, "0"), (1, "1-4"), (5, "5-19"), (20, "20+"))  # (lower bound, name)
LABEL = "clicked"  # int64, scalar: 1 clicked, 0 not

# Histories are left-padded: the most recent click is last, padding comes first.
PAD_ID = b""

DEFAULT_HISTORY_LENGTH = 20
DEFAULT_DOMAIN_HISTORY_LENGTH = 10

# Names of the splits ingestion writes.
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"


@dataclasses.dataclass(frozen=True)
class Contract:
    """Shapes that depend on ingestion settings; ingestion writes them to `metadata.json`.

    Attributes:
      domains: the domain vocabulary, in index order (domain d is `domains[d]`).
      history_length: length of the mixed-domain history.
      domain_history_length: length of each per-domain history.
    """

    domains: tuple
    history_length: int = DEFAULT_HISTORY_LENGTH
    domain_history_length: int = DEFAULT_DOMAIN_HISTORY_LENGTH

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(self.domains))
        if not self.domains or len(set(self.domains)) != len(self.domains) or not all(self.domains):
            raise ValueError(f"`domains` must be distinct non-empty names. Received: domains={self.domains!r}")
        for name in ("history_length", "domain_history_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive. Received: {name}={getattr(self, name)}")

    def to_dict(self) -> dict:
        return {"domains": list(self.domains), "history_length": self.history_length,
                "domain_history_length": self.domain_history_length}

    @classmethod
    def from_dict(cls, values: dict) -> "Contract":
        return cls(tuple(values["domains"]), int(values["history_length"]), int(values["domain_history_length"]))

    def feature_layout(self) -> dict:
        """{name: (kind, shape, default)} of every feature; kind "bytes" or "int64", default None
        for required features. Without TensorFlow (ingestion writes its schema from this)."""
        seq = (self.history_length,)
        num_domains = len(self.domains)
        return {
            USER_ID: ("bytes", (), None),
            ITEM_ID: ("bytes", (), None),
            DOMAIN: ("bytes", (), None),
            TIMESTAMP: ("int64", (), None),
            HISTORY_ITEM_IDS: ("bytes", seq, None),
            HISTORY_DOMAINS: ("bytes", seq, None),
            HISTORY_LENGTH: ("int64", (), None),
            HISTORY_TIMESTAMPS: ("int64", seq, None),
            DOMAIN_HISTORY_ITEM_IDS: ("bytes", (num_domains, self.domain_history_length), None),
            DOMAIN_HISTORY_LENGTHS: ("int64", (num_domains,), None),
            TARGET_DOMAIN_CLICKS: ("int64", (), None),
            OTHER_DOMAIN_CLICKS: ("int64", (), None),
            LABEL: ("int64", (), None),
            # Slice features have defaults, so examples made without them still parse.
            COLD_START: ("int64", (), 0),
            ACTIVITY_BUCKET: ("bytes", (), b""),
        }

    def feature_spec(self) -> dict:
        """`tf.io.parse_example` spec of every feature (TensorFlow imported lazily)."""
        import tensorflow as tf

        dtypes = {"bytes": tf.string, "int64": tf.int64}
        return {name: tf.io.FixedLenFeature(list(shape), dtypes[kind], default_value=default)
                for name, (kind, shape, default) in self.feature_layout().items()}

# The exported SavedModel's `serving_default` signature: serialized tf.Examples in, `ctr` out.
SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "examples"  # tf.string, (batch,)
SERVING_OUTPUT = "ctr"  # tf.float32, (batch,)
# `score_candidates` also returns the ctr's logit: float32 sigmoid is exactly 1.0 above a logit of
# ~17, so a model trained under a ranking objective can tie the target with many negatives at
# 1.0; ranking by the logit keeps their order.
RANKING_OUTPUT = "logit"  # tf.float32, (candidates,)

# Model inputs after preprocessing (integer indices; 0 is padding). Ids keep their feature
# names; the mask is added.
HISTORY_MASK = "hist_mask"  # bool, (batch, history_length): True for real history entries
HISTORY_TIME_GAPS = "hist_time_gaps"  # int, (batch, history_length): log2 time-gap bucket; 0 is padding
DOMAIN_HISTORY_MASK = "domain_hist_mask"  # bool, (batch, num_domains, domain_history_length)
NUM_TIME_GAP_BUCKETS = 24  # bucket b >= 1 holds gaps of [2^(b-1) - 1, 2^b - 1) minutes, capped

# The `score_candidates` signature: one user's context (a serialized tf.Example whose target
# fields are ignored) plus N candidates in, N scores out. The candidate-independent part of the
# model runs once per request.
SCORE_CANDIDATES_SIGNATURE = "score_candidates"
CANDIDATE_ITEM_IDS = "candidate_item_ids"  # tf.string, (N,)
CANDIDATE_DOMAINS = "candidate_domains"  # tf.string, (N,)


def activity_bucket(earlier_clicks: int) -> str:
    """The ACTIVITY_BUCKETS name of a number of earlier clicks."""
    name = ACTIVITY_BUCKETS[0][1]
    for lower, bucket in ACTIVITY_BUCKETS:
        if earlier_clicks >= lower:
            name = bucket
    return name

"""Full-size configuration: the seed tutorial's sizes (1024 GRU units, 256-d embeddings).

Every hyperparameter lives here; every key has a one-line comment (docs/config.md's
reference is checked against these comments by tests/test_configs.py).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (full-size) configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, shuffling and dropout.

  config.data = data = ml_collections.ConfigDict()
  data.train = "embedded:deu-eng:train"  # Training corpus: embedded:deu-eng[:train|dev|test] (Tatoeba German->English, shipped with the package) | tsv:PATH[:SRC:TGT] | text:SRC_GLOB,TGT_GLOB | tfds:NAME[:SPLIT] | prepared:DIR (nmt-prepare) | embedded[:SPLIT] (generated numbers and dates; the tests' corpus).
  data.eval = "embedded:deu-eng:dev"  # Held-out corpus for dev loss, BLEU, early stopping and the best checkpoint: same syntax as data.train, or holdout:N (N pairs carved out of data.train).
  data.test = "embedded:deu-eng:test"  # Test corpus scored once when training ends (all of it, BLEU/chrF printed and logged; never used to select or stop); "" = none (name your own, or "", when data.train is another corpus).
  data.tfds_data_dir = ""  # TFDS data dir for tfds: sources and the generated embedded[:SPLIT] corpus; "" = TFDS default (~/tensorflow_datasets).
  data.tfds_source_key = ""  # tfds: feature key of the source side; "" = first language of the config name (de-en -> de).
  data.tfds_target_key = ""  # tfds: feature key of the target side; "" = second language of the config name.
  data.max_source_length = 64  # Longest source in tokens (EOS included); longer ones are dropped or truncated.
  data.max_target_length = 64  # Longest target in tokens (BOS and EOS included).
  data.length_policy = "drop"  # What to do with over-long pairs: drop | truncate (both counted and logged).
  data.bucket_boundaries = (8, 12, 16, 20, 24, 32, 40, 48, 64)  # Padded lengths of the shape grid; the last must be >= both max lengths.
  data.batch_by = "sentences"  # Batch by a fixed number of sentences (train.batch_size) or by a token budget (train.tokens_per_batch): sentences | tokens.
  data.shuffle_buffer = 20000  # Examples in the shuffle buffer (0 disables shuffling).
  data.deterministic = True  # Deterministic tf.data ordering (reproducible runs); False is slightly faster.
  data.max_skip_fraction = 0.01  # Fail if more than this fraction of records is malformed and skipped.
  data.eval_examples = 1000  # Eval-set sentences scored with BLEU/chrF (0 = all).
  data.service_address = ""  # tf.data service dispatcher for a prepared: data.train, e.g. grpc://host:5050 ("" = off; launch/data_service.py).

  config.tokenizer = tok = ml_collections.ConfigDict()
  tok.model_type = "unigram"  # SentencePiece model: unigram | bpe.
  tok.vocab_size = 8000  # Vocabulary size of each SentencePiece model.
  tok.joint = True  # One model for both sides (True) or one per side (False).
  tok.sample_size = 200000  # Training-side sentences sampled to train SentencePiece.
  tok.character_coverage = 1.0  # SentencePiece character coverage.
  tok.sampling_alpha = 0.0  # Subword regularisation of data.train (unigram only; 0 = off, 0.1-0.5 typical): P(segmentation) ~ exp(alpha * its log-probability), seeded, both sides (docs/data.md).
  tok.sampling_nbest = 8  # Subword regularisation draws from this many best segmentations per sentence (>= 2; cost grows about linearly with it).

  config.model = model = ml_collections.ConfigDict()
  model.units = 1024  # GRU units (encoder and decoder) and attention units.
  model.embed_dim = 256  # Token embedding size.
  model.encoder_layers = 1  # Stacked encoder GRU layers.
  model.bidirectional = False  # Bidirectional encoder (outputs are projected back to model.units).
  model.decoder_layers = 1  # Stacked decoder GRU layers: the attention query is the top layer's previous state; layer 1 takes [context; embedded token], each layer above the one below's output (L > 1 trains step by step, slower per step: docs/training.md).
  model.tie_embeddings = False  # Output projection = the target embedding matrix transposed (plus a vocabulary bias; through a units -> embed_dim projection when they differ).
  model.dropout = 0.0  # Dropout on embeddings, decoder outputs and between decoder layers during training.
  model.dropout_rng = "auto"  # Generator of the dropout masks: auto | default | threefry (auto = threefry when train.xla=train_step on CPUs, where XLA draws it faster than Philox: docs/training.md; default = TensorFlow's Philox elsewhere; threefry needs train.xla=train_step: TensorFlow's own kernels lack it).
  model.recurrence = "auto"  # GRU implementation: auto | fused | keras | cudnn (auto = fused: hand-fused loops, XLA-compilable on every device; cudnn = the encoder as one cuDNN kernel, GPU only, not with train.xla=train_step).

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 64  # Global batch in sentences (split over replicas).
  train.tokens_per_batch = 0  # Global token budget per batch when data.batch_by = tokens.
  train.steps = 20000  # Total training steps.
  train.max_seconds = 0.0  # Wall-clock budget of the run in seconds, counted over all resumes (0 = none): at the budget it evaluates, checkpoints and exits 0; raise it to go on.
  train.accumulate_steps = 1  # Batches whose gradients make one update: k x train.batch_size sentences per step, exactly as one batch of that size.
  train.steps_per_loop = 10  # Train steps per tf.function call (cuts host overhead).
  train.learning_rate = 1e-3  # Peak Adam learning rate.
  train.warmup_steps = 500  # Linear warmup steps.
  train.decay = "rsqrt"  # Learning-rate decay after warmup: constant | rsqrt | cosine (cosine with train.max_seconds: it ends where the budget is measured to run out, docs/training.md).
  train.ema_decay = 0.0  # Exponential moving average of the weights, used for evaluation, the test score, translate and export (--no_ema: the raw weights); e.g. 0.999 or 0.9999, 0 = off.
  train.clip_norm = 1.0  # Clip gradients by this global norm (0 disables).
  train.label_smoothing = 0.0  # Label smoothing of the cross-entropy.
  train.precision = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16 (auto: bf16 on GPUs with CC>=8, fp16 with CC>=7 or with cudnn, bf16 on CPUs with AMX bf16 units, else float32).
  train.xla = "auto"  # XLA scope: auto | off | decoder_step | train_step (auto = train_step; decoder_step with model.recurrence=cudnn or with bf16 on a CPU).
  train.deterministic_ops = False  # TensorFlow op determinism: bitwise-reproducible runs, somewhat slower; input_wait_fraction is then not measured.
  train.max_nonfinite_steps = 10  # Stop after this many non-finite losses in a row (each is skipped).
  train.log_every = 100  # Steps between progress lines and scalar summaries.
  train.checkpoint_every = 1000  # Steps between checkpoints.
  train.keep_checkpoints = 3  # Most recent checkpoints kept (the best by dev BLEU is kept too, in checkpoints/best).
  train.eval_every = 1000  # Steps between evaluations (loss, BLEU, attention images).
  train.early_stopping_patience = 0  # Stop after this many evaluations in a row without dev BLEU beating the best by train.early_stopping_min_delta (0 = off).
  train.early_stopping_min_delta = 0.1  # BLEU points an evaluation must gain over the best to reset the patience.
  train.profile_steps = ""  # Profiler trace for a step range "START,END" ("" = off).

  config.eval = ev = ml_collections.ConfigDict()
  ev.beam_size = 4  # Beam width for evaluation and translation (1 = greedy).
  ev.length_penalty = 0.6  # GNMT length-penalty alpha (0 = none; larger favours longer outputs).
  ev.max_length_ratio = 2.0  # Longest output as a multiple of the source length (plus 5 tokens).
  ev.batch_size = 128  # Sentences per decoding batch.
  ev.probe_sentences = ("Ich habe heute keine Zeit, weil ich arbeiten muss.", "Mein Bruder wohnt seit zwei Jahren in Berlin.")  # Extra sources whose attention is plotted (German sentences outside the deu-eng corpus).
  ev.num_probes = 4  # Eval-set sentences whose attention is plotted, besides probe_sentences.

  config.distribute = dist = ml_collections.ConfigDict()
  dist.strategy = "auto"  # auto | one_device | mirrored | multi_worker (auto: multi-worker if TF_CONFIG/Slurm, else mirrored on >1 GPU).
  dist.cpu_devices = 0  # Split the CPU into this many logical devices (tests, CPU-only mirrored runs); 0 = off.
  dist.collective = "auto"  # Multi-worker all-reduce: auto | nccl | ring.
  dist.collective_timeout_s = 3600  # Seconds the other workers wait for the chief's evaluation before failing (0 = forever); the step's collectives get no timeout (dead peers are found by heartbeats).
  dist.worker_scratch_dir = ""  # Where non-chief workers write the checkpoints MultiWorkerMirroredStrategy makes them save ("" = the node's temp dir, off the shared workdir).
  return config

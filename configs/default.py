"""Every key a training config has, with its default: the schema that the other configs override.

Use from a config file (train.py puts the repository root on the path):

  from configs import default
  def get_config():
    config = default.get_config()
    config.model = 'mobilenet_v2'
    return config
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = 'classification'  # train.py runs jint8.classification for it; other tasks plug in by name

  config.model = 'resnet20'  # a name in jint8.models.MODEL_NAMES
  config.model_kwargs = ml_collections.ConfigDict({'width': 1.0})  # more constructor arguments of the model
  # 'linen', or 'nnx': the zoo's Flax NNX version of the model (resnet20, resnet56), made int8 by jint8.nnx
  config.api = 'linen'

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'cifar10_jpeg'  # a name in jint8.input_pipeline.DATASETS
  # The archive or its folder; '' searches $JINT8_DATA_DIR, then ../shared/data. Data prepared before (data_dir) must
  # have come from the archive named here (its size and SHA-256 are recorded): another one is an error
  config.dataset.archive = ''
  config.dataset.data_dir = ''  # where tfds caches the prepared dataset; '' is $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.dataset.max_train_examples = 0  # > 0: use only the first N training examples (tiny runs)
  config.dataset.max_test_examples = 0

  config.precision = 'int8'  # 'fp32', 'bf16' (bf16 compute, fp32 params) or 'int8'
  config.int8 = ml_collections.ConfigDict()
  config.int8.backend = 'auto'  # 'pallas' (GPU kernels) on a GPU, else 'xla'; or name either
  config.int8.dsgc = True  # Direction Sensitive Gradient Clipping; False clips gradients at max|g| (the ablation)
  config.int8.period = 100  # steps between two DSGC clip searches
  # > 1: also search as soon as a layer's gradient deviation exceeds this many times its deviation on the last
  # search step (jint8.state.search_due); 0: only every period
  config.int8.deviation_jump = 0.0
  config.int8.num_candidates = 32  # DSGC grid: geometric ratios of max|g| from 1 down to min_ratio
  config.int8.min_ratio = 2.0 ** -8
  config.int8.refine = 8  # clips scored in a second pass around the best candidate (0: none)
  config.int8.stochastic_rounding = True
  # Activation clip: 'delayed' (the largest max-abs of the last `history` steps: the quantizer fuses into the op
  # producing the activation) or 'maxabs' (this step's max-abs: exact, a reduction pass of its own)
  config.int8.input_clip = 'delayed'
  config.int8.history = 16
  # Depthwise convs quantize their weights with a clip per channel (exact: they never sum over channels)
  config.int8.depthwise_channel_clips = False
  config.int8.dclr = True  # Deviation Counteractive LR scaling: layer update * max(exp(-alpha d), beta)
  config.int8.alpha = 20.0
  config.int8.beta = 0.1
  config.int8.skip_nonfinite = True  # skip the params update of a step with a non-finite gradient
  config.int8.compute_dtype = 'float32'  # around the int8 convs (BN, ReLU, float layers): or 'bfloat16' (faster)
  config.int8.keep_first_conv_float = True
  config.int8.keep_dense_float = True
  config.int8.keep_depthwise_float = False  # True: depthwise convs (MobileNetV2) stay float (bench/RESULTS.md)
  config.int8.float_layers = ()  # regexes on layer paths ("stage1/block0/Conv_1") that stay float

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # any optax optimizer taking a learning_rate
  config.optimizer.kwargs = ml_collections.ConfigDict({'momentum': 0.9, 'nesterov': True})
  config.optimizer.learning_rate = 0.1  # peak learning rate for a batch of base_batch_size
  config.optimizer.base_batch_size = 128  # lr scales with batch_size / base_batch_size; 0: no scaling
  config.optimizer.schedule = 'cosine'  # 'constant', 'cosine' or 'piecewise'
  config.optimizer.warmup_epochs = 0.0  # linear warmup from 0
  config.optimizer.boundaries_epochs = ()  # 'piecewise': epochs at which the lr is multiplied by decay_factor
  config.optimizer.decay_factor = 0.1
  config.optimizer.weight_decay = 5e-4  # L2 on every param, added to the gradient (0: none)
  config.grad_clip_norm = 0.0  # clip the global gradient norm at this before the optimizer (0: no clip)
  config.label_smoothing = 0.0

  config.batch_size = 128  # global, over all devices
  config.eval_batch_size = 1000
  config.num_epochs = 200
  config.num_train_steps = 0  # > 0: train this many steps instead of num_epochs
  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0: once per epoch (and always at the end)
  config.checkpoint_every_steps = 0  # 0: once per epoch (and always at the end)
  config.checkpoint_every_minutes = 10.0  # also after this many minutes (0: never on time), and at a Ctrl-C
  config.keep_checkpoints = 3
  # Stop with an error when the logged training loss has been back near its first value for this many logs in a
  # row after falling below half of it (jint8.training.divergence; 0: never)
  config.divergence_patience = 5
  config.seed = 0
  return config

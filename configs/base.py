"""Base config: every field hierarchical_vit reads, with its default and meaning.

Experiment configs start from `get_config()` here and change only what differs.
Any field can be overridden on the command line, e.g.
`--config.model.downsample=avg_pool --config.train.num_epochs=5`.
"""

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
  """The architecture: a Swin-style hierarchical ViT with pluggable resampling."""
  m = ml_collections.ConfigDict()
  # 'classifier' (encoder -> norm -> global average pool -> linear head) or
  # 'unet' (encoder -> symmetric Swin decoder with skips -> per-pixel head).
  m.name = 'classifier'
  # num_classes, img_size and in_chans must match the data (train.py checks):
  # its classes (per-pixel classes for segmentation), data.image_size, its channels.
  m.num_classes = 10
  m.img_size = 32            # Input height = width in pixels (square inputs).
  m.in_chans = 1             # Input channels (1: data.name's default, Fashion-MNIST).
  # Stem: 'patch' = non-overlapping conv patchify (kernel = stride = patch_size)
  # + LayerNorm (Swin); 'conv' = overlapping 3x3 conv stack reaching stride
  # patch_size (better for small images trained from scratch).
  m.stem = 'patch'
  m.patch_size = 4           # Stem stride: tokens are img_size / patch_size.
  m.embed_dim = 96           # Channels of stage 0; each downsampler doubles it (x4: space_to_depth).
  m.depths = (2, 2, 6, 2)    # Swin blocks per stage.
  m.num_heads = (3, 6, 12, 24)  # Attention heads per stage; must divide width.
  m.window_size = 7          # Attention window (shrinks to the stage if larger).
  m.global_attention = ()    # Encoder stage indices that use global attention instead.
  m.mlp_ratio = 4.0          # MLP hidden width / block width.
  m.qkv_bias = True          # Bias on the q, k, v projection (Swin: True).
  # tanh GELU in the Swin blocks: ~2x cheaper on CPU; False = exact erf (Swin/timm).
  # The 'conv' stem, not part of Swin, always uses tanh.
  m.gelu_approximate = False
  m.drop_rate = 0.0          # Dropout after attention projection, MLP, classifier head.
  m.attn_drop_rate = 0.0     # Dropout on attention probabilities.
  m.drop_path_rate = 0.1     # Stochastic depth, linearly increasing per block.
  m.dtype = 'float32'        # Compute dtype: 'float32' or 'bfloat16' (params stay f32).
  # Attention core, a name in hierarchical_vit.layers.attention.ATTENTION_CORES:
  # 'einsum' (any backend) | 'einsum_lowp' (the same, logits stored in the
  # compute dtype as torch.autocast does: bfloat16 models only differ) |
  # 'cudnn' (NVIDIA GPU, bfloat16, attn_drop_rate 0) | 'pallas' (our fused
  # Triton kernel: NVIDIA GPU, attn_drop_rate 0, windows of <= 128 tokens; the
  # fastest on an H100: Swin-T 224 trains 1.3x faster than with 'einsum',
  # docs/performance.md). Same parameters and function for every core.
  m.attention = 'einsum'
  # Activation memory, hierarchical_vit.layers.swin.REMAT_POLICIES: 'none' |
  # 'block' (each Swin block recomputed in the backward pass: keeps only block
  # inputs, ~1/3 more compute) | 'block_save_dots' (keeps the Linear outputs
  # too, recomputes LayerNorm, GELU and attention). Same function either way.
  m.remat = 'none'
  # Downsampler between encoder stages: a name in
  # hierarchical_vit.resampling.DOWNSAMPLERS: patch_merge | avg_pool | max_pool
  # | soft_pool (softmax-weighted, Stergiou 2021) | conv | space_to_depth
  # | depthwise_conv_pool (PiT) | conv_max_pool (NesT's 3x3 conv, LayerNorm,
  # 3x3 max pool), and the anti-aliased blur_merge | blur_pool | max_blur_pool
  # (a binomial blur before subsampling, Zhang 2019). Width doubles per stage
  # (space_to_depth: x4, it keeps every value).
  m.downsample = 'patch_merge'
  # Options per downsampler name (its constructor's keywords, checked); only
  # the selected name's dict is used.
  m.downsample_options = ml_collections.ConfigDict({
      'conv': {'kernel_size': 2},            # 2 (stride 2) or 3 (stride 2, pad 1).
      # Pooling window at stride 2: 2 = the 2x2 blocks, 3 = overlapping (NesT).
      'avg_pool': {'kernel_size': 2},
      'max_pool': {'kernel_size': 2},
      'conv_max_pool': {'pool_size': 3},     # NesT: 3; 2 = the 2x2 blocks.
      # PiT: depthwise stride-2 conv; norm=False drops the LayerNorm PiT does not have.
      'depthwise_conv_pool': {'kernel_size': 3, 'norm': True},
      # Binomial taps per axis: 1 no blur, 2 box [1, 1] / 2, 3 [1, 2, 1] / 4, ...
      'blur_merge': {'filter_size': 3},
      'blur_pool': {'filter_size': 3},
      'max_blur_pool': {'filter_size': 3},
  })
  # Upsampler between decoder stages (UNet only): a name in
  # hierarchical_vit.resampling.UPSAMPLERS: patch_expand | interpolate |
  # transposed_conv | pixel_shuffle. Each returns to the encoder's width at
  # its level: halves after the 2x-widening downsamplers, quarters after space_to_depth.
  m.upsample = 'patch_expand'
  # Options per upsampler name, as for downsample_options; never 'factor',
  # which the decoder sets (2 between levels, patch_size for the last).
  m.upsample_options = ml_collections.ConfigDict({
      'interpolate': {'method': 'bilinear'},  # bilinear | nearest | bicubic.
  })
  # UNet decoder blocks per level, len(depths) - 1 entries, deepest first;
  # () = reversed(depths[:-1]), the encoder's mirror.
  m.decoder_depths = ()
  return m


def get_data_config() -> ml_collections.ConfigDict:
  """Input pipeline: tfds array_record sources fed by grain."""
  d = ml_collections.ConfigDict()
  # tfds name: fashion_mnist | mnist | cifar10 | cifar100 | imagenet2012;
  # segmentation (task='segmentation'): fashion_mnist_canvas | oxford_iiit_pet.
  d.name = 'fashion_mnist'
  d.data_dir = ''            # tfds data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  d.train_split = 'train'    # tfds split names; slices work, e.g. 'train[:90%]'.
  # Evaluated during training (it picks the kept best checkpoint) and by eval.py.
  # To select on held-out data, not on the test set: train_split='train[:90%]',
  # eval_split='train[90%:]', then `eval.py --split=test` once.
  d.eval_split = 'test'
  d.image_size = 32          # Images are brought to image_size x image_size ...
  # ... by 'pad' (centre zero-pad / crop) or 'resize' (bilinear). Classification
  # of data of varying size (imagenet2012) ignores it: Inception crop in
  # training, centre crop in eval; segmentation always uses it.
  d.resize_mode = 'pad'
  # grain worker processes (0 = in the main process). Speed only: the training
  # batches, their order and augmentation are the same for any value.
  d.num_workers = 0
  # Augmentation (training split only).
  d.crop_padding = 4         # Random crop after padding each side by this (0 = off; fixed-size data).
  d.hflip = True             # Random horizontal flip (turn off for digits).
  # '' | 'trivial_augment_wide' (torchvision's TrivialAugmentWide) |
  # 'trivial_augment' (TrivialAugment in RandAugment's ranges) |
  # 'randaugment' (torchvision's ops, timm's ranges: translate 0.45 of the side, not
  #   150/331; magnitude on timm's 0-10 scale, where torchvision's RandAugment(magnitude=m)
  #   over 31 bins is m / 3: its default 9 is 3 here) |
  # 'randaugment_timm' (timm's rand-m*-inc1, Swin's and DeiT's: fill = data mean, bicubic).
  # transforms.OpSpace lists each space's ops and ranges.
  d.augment = ''
  d.randaugment_num_ops = 2      # augment='randaugment*' only: ops per image ...
  d.randaugment_magnitude = 9    # ... and their strength, 0-10 (full strength at 10);
  d.randaugment_prob = 1.0       # ... each op applied with this probability (timm: 0.5) ...
  d.randaugment_magnitude_std = 0.0  # ... at magnitude ~ N(m, this) in [0, 10] (timm: 0.5).
  d.mixup_alpha = 0.0        # Beta(alpha, alpha) mixup; 0 = off.
  d.cutmix_alpha = 0.0       # Beta(alpha, alpha) cutmix; 0 = off.
  d.mix_prob = 1.0           # Probability a batch is mixed at all (if enabled).
  d.random_erasing = 0.0     # Probability of random erasing per image.
  # Normalization: per-channel mean/std in [0, 1] units; () = data set default.
  d.mean = ()
  d.std = ()
  return d


def get_train_config() -> ml_collections.ConfigDict:
  """Optimization and the loop."""
  t = ml_collections.ConfigDict()
  # Global batch (all devices, all processes); batch_size / grad_accum_steps
  # must divide by the device count.
  t.batch_size = 128
  t.num_epochs = 10.0        # Length of training in epochs (ignored if num_steps > 0).
  t.num_steps = 0            # If > 0, train exactly this many optimizer steps.
  t.learning_rate = 1e-3     # Peak AdamW learning rate (for batch_size, not rescaled).
  t.min_learning_rate = 1e-5  # Cosine schedule floor.
  t.warmup_epochs = 1.0      # Linear warmup length.
  t.weight_decay = 0.05      # Decoupled; not applied to norms, biases, position tables.
  t.b1 = 0.9                 # AdamW moment decay rates.
  t.b2 = 0.999
  t.grad_clip_norm = 5.0     # Global-norm clipping; 0 = off.
  # Micro-batches per optimizer step (activation memory of batch_size / this):
  # losses and gradients are summed over them and divided once by the batch's
  # count (images, or labelled pixels), so the step is the whole batch's,
  # dropout and stochastic-depth masks included (drawn per example). Logged
  # train/* metrics are the whole batch's (train/grad_norm before clipping).
  t.grad_accum_steps = 1
  t.label_smoothing = 0.1    # Of the one-hot (or mixed) targets; 0 = off.
  t.ema_decay = 0.0          # EMA of weights (e.g. 0.9998); 0 = off.
  t.ema_warmup = False       # Decay min(ema_decay, (1 + n) / (10 + n)) at update n (TF's).
  t.log_every_steps = 50     # Train scalars to the log and metrics.jsonl.
  t.eval_every_steps = 0     # 0 = evaluate at the end of each epoch.
  t.checkpoint_every_steps = 500  # Also at every eval, at the end and on SIGTERM.
  # Last N checkpoints kept, plus the best by the task's metric (tasks.Task.best_metric).
  t.keep_checkpoints = 2
  t.eval_batch_size = 256    # Global, like batch_size; must divide by the device and process counts.
  # Pretrained weights that start the run (not a resumed one; see hierarchical_vit.interop):
  # '' = none; None (a placeholder) = required, for configs that fine-tune. Shapes that
  # fine-tuning changes are adapted (interop.adapt_for_finetuning): bias tables resized
  # to the windows, the stem's first kernel (patch or conv stem) to model.in_chans, the
  # patch stem, as FlexiViT and timm do, to model.patch_size; a fresh head where the
  # classes differ.
  t.init_from = ''
  # How init_from's bias tables are resized to other windows (interop.BIAS_TABLE_RESIZES):
  # 'bicubic' (the Swin authors') | 'geometric' (timm >= 0.9's, from BEiT: offsets placed
  # geometrically, linear), to start from the same weights as a timm fine-tune.
  t.init_bias_table_resize = 'bicubic'
  return t


def get_mesh_config() -> ml_collections.ConfigDict:
  """Device mesh and where the train state lives (see hierarchical_vit.parallel).

  Multi-process runs need no config: train.py's --coordinator_address,
  --num_processes and --process_id flags (or JAX's auto-detection on Cloud TPU
  and SLURM) connect the processes; the mesh then spans all their devices.
  See docs/scaling.md.
  """
  mesh = ml_collections.ConfigDict()
  # 'data_parallel': params and optimizer state replicated on every device.
  # 'fsdp': arrays with >= fsdp_min_size elements split over the 'fsdp' axis
  # (ZeRO-3): per-device state memory / fsdp size, at the cost of all-gathers.
  mesh.strategy = 'data_parallel'
  mesh.axes = ('data', 'fsdp')  # Fixed: names the axes of mesh.shape (checked).
  # Size per axis; one -1 takes the remaining devices. () = every device on
  # the strategy's axis: (-1, 1) for data_parallel, (1, -1) for fsdp (on
  # several TPU slices (NUM_SLICES, -1), see dcn_shape). Hybrid FSDP (shard
  # within a host, replicate across hosts): (num_hosts, -1).
  # The batch is split over both axes either way.
  mesh.shape = ()
  # Hybrid meshes, for devices joined by a slow network: how many granules
  # (TPU slices; on one slice, processes, e.g. GPU nodes) lie along each axis;
  # each granule's devices form one (shape / dcn_shape) block of the mesh, so
  # an axis with one granule keeps its collectives on the fast links. () = one
  # TPU slice per 'data' index (and, on one slice, no hybrid mesh). E.g. 2
  # GPU nodes of 8, one process per node, strategy 'fsdp': dcn_shape (2, 1)
  # gives the mesh (2, 8), FSDP within each node (one process per GPU: the
  # granules are the GPUs, so use shape (2, -1) instead). See docs/scaling.md.
  mesh.dcn_shape = ()
  # Smaller arrays stay replicated under fsdp: gathering them costs more
  # latency than the memory saved (2**18 f32 = 1 MiB).
  mesh.fsdp_min_size = 2**18
  return mesh


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0            # Init, dropout, data order and augmentation.
  # hierarchical_vit.training.tasks.TASKS: 'classification' (image labels,
  # best checkpoint by eval/accuracy) or 'segmentation' (per-pixel labels,
  # best by eval/miou).
  config.task = 'classification'
  config.model = get_model_config()
  config.data = get_data_config()
  config.train = get_train_config()
  config.mesh = get_mesh_config()
  return config

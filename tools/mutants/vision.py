"""Mutants of utils/vision.py: adapted ResNet-18 / MobileNetV2, block MACs, resolution scaling.

Run: ``python tools/mutate.py vision`` (score in the closing note of the change).
Run of 2026-11-27 on branch s3ch8: the first 14 mutants 14/14 killed; the four of
``compress_scene_model`` (added with test_compress_scene_model_stages_and_cache_key) 4/4 killed.
"""

from mutate import Mutant

# fastest first (pytest -x stops early); the training test last
TESTS = [
    f"tests/test_vision.py::{name}"
    for name in (
        "test_bad_inputs",
        "test_conv_macs_by_hand",
        "test_separable_block_macs_three_ways",
        "test_inverted_residual_macs_three_ways",
        "test_resize_images_and_at_resolution",
        "test_resnet18_width_multiplier_scales_every_stage",
        "test_resnet18_equals_adapted_torchvision_resnet18",
        "test_mobilenet_v2_is_torchvision_with_a_small_input_stem",
        "test_course_pruning_and_int8_apply_to_resnet18",
        "test_classifier_config_is_the_cache_key",
        "test_predict_returns_labels",
        "test_compress_scene_model_stages_and_cache_key",
        "test_get_classifier_trains_once_and_caches",
    )
]
F = "utils/vision.py"
MUTANTS = [
    Mutant(
        "width multiplier truncates instead of rounding",
        F,
        "max(4, int(round(channels * width)))",
        "max(4, int(channels * width))",
    ),
    Mutant(
        "ResNet-18 with one block per stage (ResNet-10)",
        F,
        "for b in range(2):",
        "for b in range(1):",
    ),
    Mutant(
        "first stage downsamples too",
        F,
        "stride=2 if (i > 0 and b == 0) else 1",
        "stride=2 if b == 0 else 1",
    ),
    Mutant(
        "MobileNetV2 keeps ImageNet's stride-2 stem",
        F,
        "nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)",
        "nn.Conv2d(in_channels, stem.out_channels, 3, 2, 1, bias=False)",
    ),
    Mutant(
        "MobileNetV2's 24-channel stage keeps stride 2",
        F,
        "[6, 24, 2, 1]",
        "[6, 24, 2, 2]",
    ),
    Mutant(
        "depthwise convolution not grouped (a full conv)",
        F,
        "ConvBNReLU(cin, cin, kernel, stride, groups=cin), ConvBNReLU(cin, cout, 1)",
        "ConvBNReLU(cin, cin, kernel, stride), ConvBNReLU(cin, cout, 1)",
    ),
    Mutant(
        "conv MACs ignore groups",
        F,
        "return out_h * out_w * cout * (cin // groups) * kernel * kernel",
        "return out_h * out_w * cout * cin * kernel * kernel",
    ),
    Mutant(
        "separable MACs forget the pointwise part",
        F,
        "return depthwise + conv_macs(cin, cout, 1, out_h, out_w)",
        "return depthwise",
    ),
    Mutant(
        "inverted residual counts the expansion at t = 1",
        F,
        "total = conv_macs(cin, hidden, 1, in_h, in_w) if expand != 1 else 0",
        "total = conv_macs(cin, hidden, 1, in_h, in_w)",
    ),
    Mutant(
        "inverted residual: output size floors instead of ceils",
        F,
        "out_h, out_w = -(-in_h // stride), -(-in_w // stride)",
        "out_h, out_w = in_h // stride, in_w // stride",
    ),
    Mutant(
        "resize without anti-aliasing when shrinking",
        F,
        "shrink = size < min(images.shape[-2:])",
        "shrink = False",
    ),
    Mutant(
        "Resize ignores its size",
        F,
        "return resize_images(x, self.size)",
        "return x",
    ),
    Mutant(
        "cache key ignores the width",
        F,
        '"width": width,',
        '"width": 1.0,',
    ),
    Mutant(
        "scene distillation runs the teacher's epochs, not the distillation epochs",
        F,
        'epochs = recipe[f"{name}_distill_epochs"] if epochs is None else epochs',
        'epochs = recipe[f"{name}_epochs"] if epochs is None else epochs',
    ),
    Mutant(
        "scene distillation's cache key ignores the teacher's recipe",
        F,
        '"teacher": D.scene_model_config(name, seed=seed),',
        '"teacher": name,',
    ),
    Mutant(
        "scene distillation's cache key ignores the pruning amount",
        F,
        '        "amount": amount,\n        "epochs": epochs,',
        '        "amount": 0.5,\n        "epochs": epochs,',
    ),
    Mutant(
        "the INT8 stage quantizes the pruned student, not the teacher",
        F,
        '"int8": D.quantize_int8(teacher, calibration).eval(),',
        '"int8": D.quantize_int8(build(), calibration).eval(),',
    ),
    Mutant(
        "channel check accepts any channel count",
        F,
        "if channels is not None and images.shape[1] != channels:",
        "if False:",
    ),
]

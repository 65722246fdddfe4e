"""Mutants of utils/distillation.py: the KD, feature, relation, adversarial and data-free losses.

Last run (2026-11-27, tests as below): 34/34 killed, none marked equivalent.
"""

from mutate import Mutant

TESTS = ["tests/test_distillation.py"]
F = "utils/distillation.py"
KL = 'F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)'
MUTANTS = [
    # response-based
    Mutant("T² missing", F, f"soft = {KL} * temperature**2", f"soft = {KL}"),
    Mutant("T instead of T²", F, f"soft = {KL} * temperature**2", f"soft = {KL} * temperature"),
    Mutant("KL direction reversed", F, "F.kl_div(log_q, log_p,", "F.kl_div(log_p, log_q,"),
    Mutant("KL averaged over classes too", F, 'reduction="batchmean"', 'reduction="mean"'),
    Mutant(
        "alpha weights swapped",
        F,
        "return alpha * soft + (1.0 - alpha) * hard",
        "return (1.0 - alpha) * soft + alpha * hard",
    ),
    Mutant(
        "teacher not softened by T",
        F,
        "F.log_softmax(teacher_logits.detach() / temperature, dim=1)",
        "F.log_softmax(teacher_logits.detach(), dim=1)",
    ),
    Mutant(
        "teacher logits not detached",
        F,
        "teacher_logits.detach() / temperature",
        "teacher_logits / temperature",
    ),
    Mutant("empty batch not rejected", F, "if logits.shape[0] == 0:", "if False:"),
    Mutant("label range off by one", F, "labels.max() >= classes", "labels.max() > classes"),
    Mutant(
        "make_kd_loss ignores alpha",
        F,
        "temperature, y, alpha)",
        "temperature, y, 0.9)",
    ),
    # features
    Mutant(
        "hint regressor ignored",
        F,
        "mapped = regressor(student_feature.to(device_of(regressor)))",
        "mapped = student_feature",
    ),
    Mutant(
        "hint regressors not trained by distill",
        F,
        "                params += list(regressors.parameters())\n",
        "",
    ),
    Mutant("attention map always at p = 2", F, "feature.abs().pow(p)", "feature.abs().pow(2)"),
    Mutant("attention map without |·|", F, "feature.abs().pow(p)", "feature.pow(p)"),
    Mutant(
        "AT teacher map ignores p",
        F,
        "q_t = attention_map(t.detach(), p)",
        "q_t = attention_map(t.detach())",
    ),
    Mutant(
        "AT summed over positions",
        F,
        "(attention_map(s, p) - q_t).pow(2).mean()",
        "(attention_map(s, p) - q_t).pow(2).sum()",
    ),
    Mutant(
        "AT layers averaged, not summed",
        F,
        "    return total\n",
        "    return total / len(student_features)\n",
    ),
    # relations
    Mutant(
        "RKD distances by cdist's matrix-product formula",
        F,
        'compute_mode="donot_use_mm_for_euclid_dist"',
        'compute_mode="use_mm_for_euclid_dist_if_necessary"',
    ),
    Mutant(
        "RKD distances not normalised",
        F,
        "return d / off_diagonal.mean().clamp_min(1e-12)",
        "return d",
    ),
    Mutant(
        "RKD mean includes the zero diagonal",
        F,
        "return d / off_diagonal.mean().clamp_min(1e-12)",
        "return d / d.mean().clamp_min(1e-12)",
    ),
    Mutant(
        "RKD distance with squared error, not Huber",
        F,
        "return F.smooth_l1_loss(_normalized_distances(student_embedding), target)",
        "return F.mse_loss(_normalized_distances(student_embedding), target)",
    ),
    Mutant(
        "RKD angle without unit vectors", F, "unit = F.normalize(diff, p=2, dim=2)", "unit = diff"
    ),
    Mutant(
        "RKD angle with squared error, not Huber",
        F,
        "return F.smooth_l1_loss(_triplet_cosines(student_embedding), target)",
        "return F.mse_loss(_triplet_cosines(student_embedding), target)",
    ),
    # adversarial
    Mutant(
        "discriminator labels swapped",
        F,
        "d_real, torch.ones_like(d_real)",
        "d_real, torch.zeros_like(d_real)",
    ),
    Mutant(
        "student trained to look like a student",
        F,
        "adv = F.binary_cross_entropy_with_logits(fool, torch.ones_like(fool))",
        "adv = F.binary_cross_entropy_with_logits(fool, torch.zeros_like(fool))",
    ),
    Mutant(
        "discriminator step backpropagates into the student",
        F,
        "self.discriminator(student_logits.detach().to(d_device))",
        "self.discriminator(student_logits.to(d_device))",
    ),
    Mutant("adversarial weight ignored", F, "return hard + self.weight * adv", "return hard + adv"),
    # trainer
    Mutant(
        "given weight ignored",
        F,
        "weight = DEFAULT_WEIGHTS.get(method, 0.0) if weight is None else weight",
        "weight = DEFAULT_WEIGHTS.get(method, 0.0)",
    ),
    Mutant(
        "feature methods drop the hard-label term",
        F,
        "return F.cross_entropy(logits, y.to(x.device)) + weight * transfer",
        "return weight * transfer",
    ),
    Mutant(
        "teacher not in eval mode while frozen",
        F,
        "    model.eval()\n    for p in model.parameters():",
        "    for p in model.parameters():",
    ),
    Mutant(
        "frozen does not restore the mode",
        F,
        "            p.requires_grad_(flag)\n        model.train(was_training)\n",
        "            p.requires_grad_(flag)\n",
    ),
    # data-free
    Mutant(
        "DAFL maximises the entropy term the wrong way",
        F,
        "entropy_weight * neg_entropy",
        "entropy_weight * -neg_entropy",
    ),
    Mutant(
        "synthetic set made in train mode",
        F,
        "with frozen(teacher), frozen(generator):",
        "with frozen(teacher):",
    ),
    Mutant(
        "data-free KD at T = 1",
        F,
        "return kd_loss(model(x), teacher_logits, temperature)",
        "return kd_loss(model(x), teacher_logits, 1.0)",
    ),
]

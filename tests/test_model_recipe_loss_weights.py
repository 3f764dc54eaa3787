"""The recipes' loss terms: the authors' released config trains FILIP + MLCE only (loss_mix
['filip_clip_loss', 'mlce']), the paper's loss has the mapping term too; --loss-weights wins over both."""

import pytest

from egma_model.recipes import explicit_options
from egma_model.train_cli import apply_recipe, args_from_namespace, build_parser


def _resolved(argv):
    p = build_parser()
    return apply_recipe(args_from_namespace(p.parse_args(argv)), explicit_options(p, argv))


@pytest.mark.parametrize("argv,want,source", [
    ([], (1.0, 1.0, 1.0), "default"),
    (["--recipe", "authors-code"], (1.0, 1.0, 0.0), "recipe authors-code"),
    (["--recipe", "paper"], (1.0, 1.0, 1.0), "recipe paper"),
    (["--recipe", "authors-code", "--loss-weights", "1,0.5,1"], (1.0, 0.5, 1.0), "option"),
])
def test_loss_weights_per_recipe(argv, want, source):
    a, src = _resolved(argv)
    assert tuple(a.loss_weights) == want and src["loss_weights"] == source

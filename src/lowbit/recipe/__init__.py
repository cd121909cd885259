"""Recipes: ordered stages, each a method (modifier) with its options, targets and scheme."""
from lowbit.recipe.recipe import Recipe, Stage, from_methods, load_recipe

__all__ = ["Recipe", "Stage", "from_methods", "load_recipe"]

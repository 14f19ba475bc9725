"""Preferences and user profiles: prompt construction, attribute pools, fitted weights, user models."""

from personalign.personas.attributes import AttributePool, default_pool, load_attribute_file
from personalign.personas.drift import DriftProfile, PreferencePair, fit_pairs, fit_profile
from personalign.personas.prompts import build_prompt_ids, has_chat_template, render_prompt

__all__ = ["build_prompt_ids", "has_chat_template", "render_prompt", "AttributePool", "default_pool",
           "load_attribute_file", "DriftProfile", "PreferencePair", "fit_profile", "fit_pairs"]

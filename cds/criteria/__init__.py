"""Trial eligibility criteria as versioned data, and the small engine that evaluates them."""

from cds.criteria.definitions import Criterion, Trial, TrialSet, load_trial_set, load_trials

__all__ = ["Criterion", "Trial", "TrialSet", "load_trial_set", "load_trials"]

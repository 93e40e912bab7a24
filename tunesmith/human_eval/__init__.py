"""Human evaluation: blinded rating sheets, the local rating page, scores and agreement.

Not part of core; ``tunesmith human-eval`` is its command.
"""

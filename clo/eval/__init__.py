"""Step 3: a trained model -> numbers (eval.py drives it).

Generation graded by language ID and degenerate-answer checks, held-out preference, multiple
choice, an LLM judge, the prompt sets, and the report. Imports model, train's scoring and the
batching it scores (eval scores exactly what training scores), and the floor.
"""

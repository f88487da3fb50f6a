"""The feedback store: users, conversations, messages, votes and preference pairs.

Everything the product learns from lives here, behind keyword-only functions in
`feedback.store`. This package never loads a model.
"""

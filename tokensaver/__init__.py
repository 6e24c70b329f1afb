"""tokensaver"""

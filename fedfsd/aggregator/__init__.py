"""fedfsd.aggregator"""

"""fedfsd.data"""

from dashboard.views import compare

compare.render()

from dashboard.views import sweep

sweep.render()

from dashboard.views import study

study.render()

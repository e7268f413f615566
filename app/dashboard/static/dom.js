// The dashboard pages' two DOM helpers (every value goes through textContent, never HTML).
window.SluiceDom = {
  byId: function (id) { return document.getElementById(id); },
  el: function (tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  },
};

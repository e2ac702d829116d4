def test_capabilities_are_protocols() -> None:
    """Callers ask an editor what it can do through protocols, not by its class: RLSEdit retracts and
    states its objective; MEMIT does neither."""
    from rlsedit.editors.base import HasObjective, Retractable, editor_class

    rls, memit = editor_class("rlsedit"), editor_class("memit")
    assert issubclass(rls, Retractable) and issubclass(rls, HasObjective)
    assert not issubclass(memit, Retractable) and not issubclass(memit, HasObjective)

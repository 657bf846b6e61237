defmodule Quichex.Connection.Paths do
  @moduledoc false
  # The network paths of a connection under our own ids (0 is the path the
  # connection started on; ids are never reused within a connection), the
  # extra UDP sockets a client opened to migrate or probe, and the
  # migrate/probe calls waiting for a path's validation.

  alias Quichex.Connection.UDP

  # `waiting_cid`: probes started before the peer gave a spare connection ID,
  # retried when it does: [{local, peer, kind, from}].
  defstruct ids: %{}, next: 1, sockets: %{}, pending: %{}, waiting_cid: []

  @type addr :: {:inet.ip_address(), :inet.port_number()}
  @type t :: %__MODULE__{
          ids: %{{addr, addr} => non_neg_integer()},
          next: pos_integer(),
          sockets: %{addr => :socket.socket()},
          pending: %{{addr, addr} => {:migrate | :probe, :gen_statem.from()}},
          waiting_cid: [{addr, addr, :migrate | :probe, :gen_statem.from()}]
        }

  def new(local, peer), do: %__MODULE__{ids: %{{local, peer} => 0}}

  @doc "The id of `{local, peer}`, new if it has none yet: `{id, new?, paths}`."
  def id(paths, local, peer) do
    case paths.ids do
      %{{^local, ^peer} => id} ->
        {id, false, paths}

      _ ->
        id = paths.next
        {id, true, %{paths | ids: Map.put(paths.ids, {local, peer}, id), next: id + 1}}
    end
  end

  @doc "The `{local, peer}` of path `id`, or nil."
  def addrs(paths, id) do
    Enum.find_value(paths.ids, fn {addrs, path_id} -> if path_id == id, do: addrs end)
  end

  def put_socket(paths, local, socket),
    do: %{paths | sockets: Map.put(paths.sockets, local, socket)}

  def socket(paths, local), do: Map.get(paths.sockets, local)

  @doc "The local address a socket of ours is bound to, or nil."
  def local_of(paths, socket) do
    Enum.find_value(paths.sockets, fn {local, s} -> if s == socket, do: local end)
  end

  @doc "Closes the extra socket bound to `local` (not the connection's own)."
  def close_socket(paths, local) do
    case Map.pop(paths.sockets, local) do
      {nil, _} ->
        paths

      {socket, sockets} ->
        UDP.close(socket)
        %{paths | sockets: sockets}
    end
  end

  def close_all(paths) do
    Enum.each(paths.sockets, fn {_local, socket} -> UDP.close(socket) end)
    %{paths | sockets: %{}}
  end

  def wait(paths, local, peer, kind, from),
    do: %{paths | pending: Map.put(paths.pending, {local, peer}, {kind, from})}

  def take_waiter(paths, local, peer) do
    {waiter, pending} = Map.pop(paths.pending, {local, peer})
    {waiter, %{paths | pending: pending}}
  end

  def fail_waiters(paths, reply) do
    Enum.each(paths.pending, fn {_, {_kind, from}} -> :gen_statem.reply(from, reply) end)
    Enum.each(paths.waiting_cid, fn {_, _, _, from} -> :gen_statem.reply(from, reply) end)
    %{paths | pending: %{}, waiting_cid: []}
  end
end

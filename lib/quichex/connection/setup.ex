defmodule Quichex.Connection.Setup do
  @moduledoc false
  # What a connection process does before its first event: a client opens
  # and connects its UDP socket and creates its quiche connection; a server
  # connection is created from the listener's first datagram. Either way the
  # result is the process's initial State.

  alias Quichex.Native
  alias Quichex.Connection.{CID, Driver, Reports, State, UDP}

  @doc "Creates the quiche connection (and, for a client, its socket): the initial state."
  def open(%{role: :client} = args) do
    scid = CID.generate(args.cid_generator)

    with {:ok, socket, caps} <- udp_open(args.local_ip, args.local_port),
         {:ok, local} <- connect_socket(socket, args.peer),
         {:ok, native} <-
           nif(
             socket,
             Native.connection_connect(
               args.native_config,
               args.server_name,
               scid,
               local,
               args.peer,
               Driver.window(),
               args.session
             )
           ) do
      data =
        new_state(args, native, socket, local, caps,
          owns_socket: true,
          cids: [scid],
          reset_key: CID.new_key(),
          session: args.session,
          early_data: args.early_data and args.session != nil
        )

      {:ok, data}
    end
  end

  def open(%{role: :server} = args) do
    case Native.connection_accept(
           args.native_config,
           args.scid,
           args.odcid,
           args.local,
           args.peer,
           Driver.window(),
           CID.reset_token(args.reset_key, args.scid)
         ) do
      {:ok, native} ->
        data =
          new_state(args, native, args.socket, args.local, args.caps,
            retry: args.odcid != nil,
            cids: args.cids,
            listener: args.listener,
            handler: args.handler,
            reset_key: args.reset_key
          )

        {:ok, data}

      {:error, reason} ->
        {:error, Reports.transport_error(reason)}
    end
  end

  defp new_state(args, native, socket, local, caps, extra) do
    owner = args.owner

    State.new(
      [
        role: args.role,
        native: native,
        socket: socket,
        local: local,
        peer: args.peer,
        gso: caps.gso,
        owner: owner,
        owner_ref: owner && Process.monitor(owner),
        active: args.active,
        stream_active: args.stream_active,
        dgrams: args.dgrams,
        cid_generator: args.cid_generator
      ] ++ extra
    )
  end

  defp udp_open(ip, port) do
    case UDP.open(ip, port) do
      {:ok, socket, caps} -> {:ok, socket, caps}
      {:error, reason} -> {:error, Reports.transport_error({:socket, reason})}
    end
  end

  # A client's socket is connected to the server: the kernel then filters
  # datagrams from elsewhere and picks the route's source address, which the
  # NIF needs as the concrete local address.
  defp connect_socket(socket, peer) do
    with :ok <- :socket.connect(socket, UDP.sockaddr(peer)),
         {:ok, local} <- UDP.sockname(socket) do
      {:ok, local}
    else
      {:error, reason} ->
        UDP.close(socket)
        {:error, Reports.transport_error({:socket, reason})}
    end
  end

  defp nif(_socket, {:ok, native}), do: {:ok, native}

  defp nif(socket, {:error, reason}) do
    UDP.close(socket)

    case reason do
      {:badarg, "session"} -> {:error, Reports.transport_error(:invalid_session)}
      reason -> {:error, Reports.transport_error(reason)}
    end
  end
end
